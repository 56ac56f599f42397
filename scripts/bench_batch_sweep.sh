#!/usr/bin/env bash
# Batch > 1: AR and the best training-free methods decoding 1, 2, 4, 8 and 16 MT-Bench first turns at once
# (greedy, 128 new tokens, 16 questions), then one table and plot of throughput and of speedup over AR at the
# same batch size (results/batch_sweep/batch_sweep.{md,png}). Token Recycling's tree is sized by --budget auto
# for each batch size (calibrated once per batch size, then cached).
#   bash scripts/bench_batch_sweep.sh [batch sizes...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then sizes=("$@"); else sizes=(1 2 4 8 16); fi
runs=()
for b in "${sizes[@]}"; do
  spec-jax bench --methods ar,pld,token_recycling/budget=auto,lookahead,hf_ar --dataset mtbench --per-category 2 \
    --max-turns 1 --max-new-tokens 128 --batch-size "$b" --out "results/batch_sweep/b$b"
  runs+=("results/batch_sweep/b$b")
done
python -m spec_jax.bench.report "${runs[@]}" --out results/batch_sweep
