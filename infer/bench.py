"""Benchmark methods and peers in one run: `python infer/bench.py --config configs/bench_engine.yaml`
(same as `spec-jax bench`)."""

import sys

from spec_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
