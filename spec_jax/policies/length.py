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


@dataclasses.dataclass(frozen=True)
class ThompsonLength(LengthPolicy):
    """EESD's Thompson-sampling length control (Liu et al. 2024, Beta-TS), per sequence.

    Whether a draft token is accepted is a Bernoulli trial with an unknown rate theta, whose posterior is
    Beta(alpha, beta). Each step theta is sampled from it (Thompson sampling) and drafting continues while
    Bernoulli(theta) trials say the next draft would be accepted: the length is 1 plus the run of successes
    (at most k). A verified chain observes that run: `accepted` successes, then one failure where a draft
    was rejected, so alpha += accepted and beta += [accepted < drafted] (the Beta-geometric update).
    """

    alpha: float = 1.0  # the prior: alpha - 1 accepted and beta - 1 rejected drafts seen before any step
    beta: float = 1.0
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not (self.alpha > 0 and self.beta > 0):
            raise InvalidArgumentError(f"Thompson prior Beta({self.alpha}, {self.beta}): both must be > 0")

    def init(self, batch: int):
        # One key per sequence ([B, 2] raw keys), so the state splits over the batch like everything else.
        return {"alpha": jnp.full((batch,), self.alpha, jnp.float32),
                "beta": jnp.full((batch,), self.beta, jnp.float32),
                "key_B": jax.random.split(jax.random.PRNGKey(self.seed), batch)}

    def limit(self, state) -> jax.Array:
        def one(key, a, b):
            k_theta, k_trials = jax.random.split(key)
            theta = jax.random.beta(k_theta, a, b)
            success_K = jax.random.uniform(k_trials, (self.k - 1,)) < theta
            return 1 + jnp.sum(jnp.cumprod(success_K.astype(jnp.int32)))
        return jax.vmap(one)(state["key_B"], state["alpha"], state["beta"]).astype(jnp.int32)

    def update(self, state, num_accepted_B, num_drafted_B, active_B):
        seen_B = active_B & (num_drafted_B > 0)
        rejected_B = num_accepted_B < num_drafted_B
        return {"alpha": state["alpha"] + jnp.where(seen_B, num_accepted_B, 0).astype(jnp.float32),
                "beta": state["beta"] + (seen_B & rejected_B).astype(jnp.float32),
                "key_B": jax.vmap(lambda key: jax.random.split(key)[1])(state["key_B"])}


POLICIES = {"fixed": FixedLength, "heuristic": Heuristic, "svip": EntropyStop, "thompson": ThompsonLength}


def make_policy(name: str, k: int, **kw) -> LengthPolicy:
    if name not in POLICIES:
        raise InvalidArgumentError(f"unknown length policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](k=k, **kw)
