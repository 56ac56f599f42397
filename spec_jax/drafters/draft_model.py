"""`draft`: a separate, smaller Llama-family model with the target's tokenizer drafts a chain.

The draft model keeps its own KV cache. Each step it is fed [last committed token, pending token]:
re-feeding the last committed token fills the one entry it never computed when its whole chain was
accepted (Leviathan et al. 2023; the draft never sees its own last draft token otherwise).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from spec_jax.drafters.base import PrefillContext, StepContext
from spec_jax.drafters.chain import ChainDrafter, draft_chain
from spec_jax.errors import TokenizerMismatchError
from spec_jax.models import Config, forward, init_cache


@dataclasses.dataclass(frozen=True)
class DraftModel(ChainDrafter):
    draft_cfg: Config = None
    name = "draft"

    def check(self, cfg: Config, params) -> None:
        if self.draft_cfg is None or params is None:
            raise TypeError("the draft-model drafter needs draft_cfg and draft params")
        if self.draft_cfg.vocab_size != cfg.vocab_size:
            raise TokenizerMismatchError(
                f"draft vocabulary size {self.draft_cfg.vocab_size} != target's {cfg.vocab_size}; "
                "the draft model must use the target's tokenizer")

    def _step(self, params):
        def model_step(cache, tokens, positions):
            cache = cache.replace(lengths=positions[:, 0])
            out = forward(params, self.draft_cfg, tokens, positions, cache,
                          logits_at=jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32))
            return out.logits[:, 0], out.cache
        return model_step

    def init(self, params, cfg, batch, cache_size):
        return {"cache": init_cache(self.draft_cfg, batch, cache_size), "policy": self.policy.init(batch)}

    def prefill(self, params, state, ctx: PrefillContext):
        # Padding entries past each prompt are scratch, overwritten by later steps.
        B, T = ctx.prompts.shape
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        out = forward(params, self.draft_cfg, ctx.prompts, positions, state["cache"], compute_logits=False)
        return {**state, "cache": out.cache}

    def propose(self, params, state, ctx: StepContext):
        prev = jnp.take_along_axis(ctx.tokens, (ctx.lengths - 1)[:, None], axis=1)[:, 0]
        first = jnp.stack([prev, ctx.pending], axis=1)
        positions = jnp.stack([ctx.lengths - 1, ctx.lengths], axis=1)
        tree, cache = draft_chain(self._step(params), state["cache"], first, positions, self.policy,
                                  state["policy"], ctx.sampling, ctx.rng)
        return tree, {**state, "cache": cache}, ctx.cache
