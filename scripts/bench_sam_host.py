"""Host time of the suffix-automaton drafter per decoding step at a 4,000-token context.

A 4,000-token text (with a repeated stretch, so matches exist) is ingested once, as a prompt would be;
then the text grows by 2 tokens per step (tau ~2) for 100 steps and each step drafts 6 tokens.
Run: python scripts/bench_sam_host.py
"""

import time

import numpy as np

from spec_jax.drafters.suffix_automaton import SAMHost

rng = np.random.default_rng(0)
base = rng.integers(0, 49_152, size=600)
text = np.concatenate([base, base[100:400], rng.integers(0, 49_152, size=3_400)])[:4_200]
buf = np.zeros((1, 4_300), np.int32)
buf[0, : len(text)] = text

host = SAMHost()
t = time.perf_counter()
host.draft(buf, np.array([3_999]), 6, 4)
print(f"ingest 4,000 tokens: {1e3 * (time.perf_counter() - t):.2f} ms")
before, steps = host.seconds, 0
for length in range(4_000, 4_200, 2):
    host.draft(buf, np.array([length]), 6, 4)
    steps += 1
print(f"per step at 4,000-4,200 tokens: {1e3 * (host.seconds - before) / steps:.3f} ms")
