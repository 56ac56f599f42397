"""Draft-length policies for chain drafters.

A policy is static (hashable); its state is a pytree carried in the drafter state. Each step the
drafter drafts up to `limit(state)` tokens, stopping early where `stop(q)` says so, and after
verification `update` sees how many were accepted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spec_jax.errors import InvalidArgumentError
from spec_jax.sampling import entropy


@dataclasses.dataclass(frozen=True)
class LengthPolicy:
    """Base policy: always draft `k` tokens."""

    k: int = 5

    def __post_init__(self):
        if self.k < 1:
            raise InvalidArgumentError(f"draft length k must be >= 1, got {self.k}")

    def init(self, batch: int):
        return jnp.full((batch,), self.k, jnp.int32)

    def limit(self, state) -> jax.Array:
        """[B] number of tokens to draft this step (<= k)."""
        return state

    def stop(self, q_BxV: jax.Array) -> jax.Array:
        """[B] True where drafting should stop after the token just drawn from q."""
        return jnp.zeros(q_BxV.shape[:1], bool)

    def update(self, state, num_accepted_B, num_drafted_B, active_B):
        return state


class FixedLength(LengthPolicy):
    """Draft exactly k tokens every step."""


@dataclasses.dataclass(frozen=True)
class Heuristic(LengthPolicy):
    """transformers' assisted-generation heuristic: +2 after a fully accepted draft, -1 otherwise."""

    start: int = 5

    def init(self, batch: int):
        return jnp.full((batch,), min(self.start, self.k), jnp.int32)

    def update(self, state, num_accepted_B, num_drafted_B, active_B):
        grown = jnp.where(num_accepted_B >= num_drafted_B, state + 2, state - 1)
        return jnp.where(active_B, jnp.clip(grown, 1, self.k), state)


@dataclasses.dataclass(frozen=True)
class EntropyStop(LengthPolicy):
    """SVIP-style entropy stop (Zhang et al. 2024): stop drafting once sqrt(H(q)) exceeds `threshold`.

    The draft distribution's entropy bounds how likely the target is to accept its token; a draft
    that is unsure of its token is unlikely to be accepted, so drafting further wastes time.
    """

    threshold: float = 0.6

    def stop(self, q_BxV):
        return jnp.sqrt(entropy(q_BxV)) > self.threshold


POLICIES = {"fixed": FixedLength, "heuristic": Heuristic, "svip": EntropyStop}


def make_policy(name: str, k: int, **kw) -> LengthPolicy:
    if name not in POLICIES:
        raise InvalidArgumentError(f"unknown length policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](k=k, **kw)
