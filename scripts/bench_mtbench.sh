#!/usr/bin/env bash
# Reproduce the Spec-Bench-style MT-Bench run (both turns) with transformers' peers, and the budget sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
spec-jax bench --config configs/bench_mtbench.yaml "$@"
spec-jax bench --config configs/bench_budget_sweep.yaml "$@"
