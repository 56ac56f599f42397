#!/usr/bin/env bash
# Reproduce the foundation benchmark: our jitted AR against transformers' generate, same prompts, same run.
set -euo pipefail
cd "$(dirname "$0")/.."
spec-jax bench --config configs/bench_ar_vs_hf.yaml "$@"
