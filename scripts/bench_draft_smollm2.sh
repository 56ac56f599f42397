#!/usr/bin/env bash
# Issue 13's benchmark: the distilled draft (fixed K, heuristic, reduced vocabulary, SpecDec++, tree), early
# exit, layer skipping and transformers' assisted generation with the same draft, on MT-Bench and HumanEval.
#   bash scripts/bench_draft_smollm2.sh
# The skip set is searched first (once; delete the JSON file to search again). early_exit uses the exit and
# draft length its recipe chose; `spec-jax search-exit --out F` and `exit-file: F` in the configs time them here.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results
[ -f results/skip_smollm2.json ] || spec-jax search-skip --out results/skip_smollm2.json
spec-jax bench --config configs/bench_draft_mtbench.yaml
spec-jax bench --config configs/bench_draft_humaneval.yaml
