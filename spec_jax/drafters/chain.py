"""The on-device loop shared by chain drafters that run a model autoregressively (draft model, layer skip)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from spec_jax import sampling as sp
from spec_jax.drafters.base import StepResult, TemplateDrafter
from spec_jax.drafters.registry import Option
from spec_jax.policies import POLICIES, FixedLength, LengthPolicy
from spec_jax.trees import DraftTree, TreeTemplate

LENGTH_POLICY = Option("length_policy", str, "fixed",
                       "draft-length policy: fixed, transformers' heuristic (+2/-1), SVIP entropy stop, or EESD "
                       "Thompson sampling",
                       choices=tuple(POLICIES))

# model_step(cache, tokens[B, T], positions[B, T]) -> (logits[B, V] of the last token, cache); the
# T new entries are written at cache slots positions[:, 0].. (slot = position for chain drafters).
# With a `stop_fn`, model_step returns (logits, cache, features[B, E] of the last token) instead.
ModelStep = Callable
# stop_fn(i, features_BxE, carry) -> (stop_B, carry): a learned stop rule (SpecDec++) called after the
# draft token i (0-based) is drawn, with the draft's features of the token fed before it (the root for i = 0).
StopFn = Callable


def draft_chain(model_step: ModelStep, cache, first_tokens_BxT, first_positions_BxT,
                policy: LengthPolicy, policy_state, s: sp.Sampling, rng, stop_fn: StopFn | None = None,
                stop_carry=None) -> tuple[DraftTree, object]:
    """Draft up to `policy.k` tokens one at a time; returns the chain and the model's cache.

    Drafting stops for the whole batch when every sequence has hit its policy limit, entropy stop
    or `stop_fn` stop; a sequence that stopped earlier keeps drafting (its extra nodes are marked
    invalid), so the loop costs as many draft forwards as the longest chain in the batch.
    """
    K = policy.k
    B = first_tokens_BxT.shape[0]
    limit = policy.limit(policy_state)
    keep_q = not s.greedy
    step = model_step if stop_fn is not None else (lambda c, t, p: (*model_step(c, t, p), None))

    logits, cache, feats = step(cache, first_tokens_BxT, first_positions_BxT)
    pos0 = first_positions_BxT[:, -1]
    tokens = jnp.zeros((B, K), jnp.int32)
    qs = jnp.zeros((B, K, logits.shape[-1]), jnp.float32) if keep_q else None
    valid = jnp.zeros((B, K), bool)

    def body(carry):
        i, logits, feats, cache, tokens, qs, valid, live, stop_carry, rng = carry
        rng, key = jax.random.split(rng)
        q = sp.probs(logits, s) if keep_q else None
        x = sp.next_token(key, logits, s) if not keep_q else sp.sample(key, q).astype(jnp.int32)
        tokens = tokens.at[:, i].set(x)
        valid = valid.at[:, i].set(live)
        if keep_q:
            qs = qs.at[:, i].set(q)
        stop = policy.stop(q if keep_q else sp.probs(logits, sp.Sampling(1.0)))
        if stop_fn is not None:
            learned, stop_carry = stop_fn(i, feats, stop_carry)
            stop = stop | learned
        live = live & (i + 1 < limit) & ~stop
        logits, cache, feats = jax.lax.cond(
            jnp.any(live) & (i + 1 < K),
            lambda c: step(c, x[:, None], (pos0 + i + 1)[:, None]),
            lambda c: (logits, c, feats), cache)
        return i + 1, logits, feats, cache, tokens, qs, valid, live, stop_carry, rng

    init = (jnp.int32(0), logits, feats, cache, tokens, qs, valid, jnp.ones((B,), bool), stop_carry, rng)
    _, _, _, cache, tokens, qs, valid, _, _, _ = jax.lax.while_loop(
        lambda c: (c[0] < K) & jnp.any(c[7]), body, init)
    return TreeTemplate.chain(K).build(tokens, q=qs, valid_BxN=valid), cache


@dataclasses.dataclass(frozen=True)
class ChainDrafter(TemplateDrafter):
    """Base of drafters that propose one chain of up to `policy.k` tokens and adapt its length."""

    policy: LengthPolicy = FixedLength(5)

    @property
    def template(self) -> TreeTemplate:
        return TreeTemplate.chain(self.policy.k)

    def observe(self, weights, state, result: StepResult):
        drafted_B = jnp.sum(result.tree.valid, axis=1)
        policy = self.policy.update(state["policy"], result.num_accepted_B, drafted_B, result.active_B)
        return {**state, "policy": policy}
