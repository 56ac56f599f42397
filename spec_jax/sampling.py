"""Logits processing shared by every decoding method: temperature, top-k, top-p.

Target and draft distributions go through the same `probs` so that speculative verification
compares like with like (DESIGN.md: p and q are taken after the same processing).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spec_jax.errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling settings; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be an integer >= 0 (0 disables), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"top_p must be in (0, 1] (1 disables), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs(logits: jax.Array, s: Sampling) -> jax.Array:
    """Processed next-token probabilities [..., V] in float32 (one-hot argmax when greedy)."""
    logits = logits.astype(jnp.float32)
    if s.greedy:
        return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)
    logits = logits / s.temperature
    neg = jnp.finfo(jnp.float32).min
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    p = jax.nn.softmax(logits, axis=-1)
    if s.top_p < 1.0:
        # Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
        sorted_p = jnp.sort(p, axis=-1)[..., ::-1]
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
        cutoff = jnp.min(jnp.where(before < s.top_p, sorted_p, jnp.inf), axis=-1, keepdims=True)
        p = jnp.where(p >= cutoff, p, 0.0)
        p = p / jnp.sum(p, axis=-1, keepdims=True)
    return p


def top_k(x: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis (the same values and indices, ties to the lower index), searched
    only in the k blocks of `block` entries with the largest maxima, which hold the k largest entries.

    Each block's maximum is its best entry (ties to the lower index), and blocks are contiguous, so a block
    holding one of the k best entries has its maximum among the k best too. On XLA:CPU, for the top 8 of
    81 x 49152 logits (Token Recycling's update), `lax.top_k` takes 5.7 ms and this 0.5 ms.
    """
    V = x.shape[-1]
    n = -(-V // block)
    if n <= k:
        return jax.lax.top_k(x, k)
    lead = x.shape[:-1]
    if n * block > V:  # pad the last block with entries no real one loses to
        x = jnp.concatenate([x, jnp.full((*lead, n * block - V), -jnp.inf, x.dtype)], axis=-1)
    blocks = x.reshape(*lead, n, block)
    best = jnp.sort(jax.lax.top_k(jnp.max(blocks, axis=-1), k)[1], axis=-1)  # in index order, for the ties
    values, at = jax.lax.top_k(jnp.take_along_axis(blocks, best[..., None], axis=-2).reshape(*lead, k * block), k)
    return values, jnp.take_along_axis(best, at // block, axis=-1) * block + at % block


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax` over the last axis as int32 (ties to the lower index), through the blockwise `top_k`:
    XLA:CPU's own argmax over 81 x 49152 logits takes 8.8 ms, this 0.3 ms."""
    return top_k(x, 1)[1][..., 0].astype(jnp.int32)


def entropy(p: jax.Array) -> jax.Array:
    """Shannon entropy (nats) of probabilities [..., V] over the last axis."""
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-38)), 0.0), axis=-1)


def sample(rng: jax.Array, p: jax.Array) -> jax.Array:
    """Draw token ids from probabilities [..., V]."""
    return jax.random.categorical(rng, jnp.log(jnp.maximum(p, 1e-38)) + jnp.where(p > 0, 0.0, -jnp.inf))


def next_token(rng: jax.Array, logits: jax.Array, s: Sampling) -> jax.Array:
    """Greedy argmax or a sample from the processed distribution."""
    if s.greedy:
        return argmax(logits)
    return sample(rng, probs(logits, s)).astype(jnp.int32)
