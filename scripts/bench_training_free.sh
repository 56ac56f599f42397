#!/usr/bin/env bash
# Reproduce the training-free drafter experiment: MT-Bench first turns, then HumanEval prompts, each with
# our AR and transformers' AR and prompt lookup in the same run. Results: results/training_free_*/.
set -euo pipefail
cd "$(dirname "$0")/.."
spec-jax bench --config configs/bench_training_free.yaml "$@"
spec-jax bench --config configs/bench_training_free_humaneval.yaml "$@"
