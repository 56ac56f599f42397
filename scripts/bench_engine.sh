#!/usr/bin/env bash
# Reproduce the engine benchmark: search a layer-skip set on calibration prompts (once), then run
# AR, draft, draft_tree, layer_skip and Hugging Face AR on the same MT-Bench prompts in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
skip=results/skip_smollm2.json
if [ ! -f "$skip" ]; then
  spec-jax search-skip --model smollm2-135m --out "$skip"
fi
spec-jax bench --config configs/bench_engine.yaml "$@"
