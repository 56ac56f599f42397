"""Per-step cost of SAM's matching at a 4,000-token context: the request's own text on device (inside a
fused while loop, as the decoding loop runs it) and a static corpus on the host (the suffix automaton).

A 4,000-token text (with a repeated stretch, so matches exist) is the prompt; then the text grows by 2
tokens per step (tau ~2) for 100 steps and each step drafts 6 tokens. The corpus is the same text.
Run: python scripts/bench_sam_host.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters.suffix_automaton import SAMHost, SuffixAutomaton, ingest, ingest_prompt, own_draft

rng = np.random.default_rng(0)
base = rng.integers(0, 49_152, size=600)
text = np.concatenate([base, base[100:400], rng.integers(0, 49_152, size=3_400)])[:4_200]
buf = np.zeros((1, 4_300), np.int32)
buf[0, : len(text)] = text
STEPS, PER, K = 100, 2, 6

# On device: the prompt's match array once, then one `ingest` of 2 tokens and one draft per step.
tokens = jnp.asarray(buf)
prompt = jax.jit(ingest_prompt)
jax.block_until_ready(prompt(tokens, jnp.array([3_999])))
t = time.perf_counter()
match = jax.block_until_ready(prompt(tokens, jnp.array([3_999])))
print(f"on device, ingest a 4,000-token prompt: {1e3 * (time.perf_counter() - t):.1f} ms")


@jax.jit
def steps(match_BxS):
    def body(carry):
        i, m, acc = carry
        end = 3_999 + PER * i
        draft_BxK, length_B = own_draft(m, tokens, end[None], K)
        m = ingest(m, tokens, end[None], jnp.full((1,), PER), PER + 1)
        return i + 1, m, acc + jnp.sum(draft_BxK) + length_B[0]
    return jax.lax.while_loop(lambda c: c[0] < STEPS, body, (jnp.int32(0), match_BxS, jnp.int32(0)))


jax.block_until_ready(steps(match))
t = time.perf_counter()
jax.block_until_ready(steps(match))
print(f"on device, per step at 4,000-4,200 tokens: {1e3 * (time.perf_counter() - t) / STEPS:.3f} ms")

# On the host: the corpus automaton (built once), advanced through the prompt, then 2 tokens per step.
host = SAMHost(SuffixAutomaton(text.tolist()))
t = time.perf_counter()
host.draft(buf, np.array([3_999]), K)
print(f"corpus on the host, advance through 4,000 tokens: {1e3 * (time.perf_counter() - t):.2f} ms")
before = host.seconds
for length in range(4_000, 4_000 + PER * STEPS, PER):
    host.draft(buf, np.array([length]), K)
print(f"corpus on the host, per step at 4,000-4,200 tokens: {1e3 * (host.seconds - before) / STEPS:.3f} ms")
