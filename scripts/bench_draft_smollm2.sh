#!/usr/bin/env bash
# Issue 13's benchmark: the distilled draft (fixed K, heuristic, reduced vocabulary, SpecDec++, tree), early
# exit, layer skipping and transformers' assisted generation with the same draft, on MT-Bench and HumanEval.
#   bash scripts/bench_draft_smollm2.sh
# The skip set and the exit are searched first by measured speed (once each; delete a JSON file to search again).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results
[ -f results/skip_smollm2.json ] || spec-jax search-skip --out results/skip_smollm2.json
[ -f results/exit_smollm2.json ] || spec-jax search-exit --out results/exit_smollm2.json
spec-jax bench --config configs/bench_draft_mtbench.yaml
spec-jax bench --config configs/bench_draft_humaneval.yaml
