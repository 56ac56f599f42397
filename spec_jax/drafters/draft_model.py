"""`draft` and `draft_tree`: a separate, smaller Llama-family model with the target's tokenizer
drafts a chain (`draft`) or a dynamic tree (`draft_tree`, EAGLE-2-style expansion; see
`dynamic_tree`).

The draft model keeps its own KV cache. Each step it is fed [last committed token, pending token]:
re-feeding the last committed token fills the one entry it never computed when its whole chain was
accepted (Leviathan et al. 2023; the draft never sees its own last draft token otherwise). Chain
drafts sit at their final cache slots already; a tree's accepted path is moved there by `commit`
in `observe`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from spec_jax.drafters.base import Drafter, PrefillContext, StepContext, StepResult
from spec_jax.drafters.chain import ChainDrafter, draft_chain
from spec_jax.drafters.dynamic_tree import DynamicTree, draft_dynamic_tree
from spec_jax.errors import TokenizerMismatchError
from spec_jax.models import Config, commit, forward, init_cache


class _DraftModelBase:
    """What both draft-model drafters share: the checks, the cache and the prompt prefill."""

    draft_cfg: Config

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

    def prefill(self, params, state, ctx: PrefillContext):
        # Padding entries past each prompt are scratch, overwritten by later steps.
        B, T = ctx.prompts.shape
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        out = forward(params, self.draft_cfg, ctx.prompts, positions, state["cache"], compute_logits=False)
        return {**state, "cache": out.cache}

    @staticmethod
    def _root_inputs(ctx: StepContext):
        """[last committed token, pending token] and their positions."""
        prev = jnp.take_along_axis(ctx.tokens, (ctx.lengths - 1)[:, None], axis=1)[:, 0]
        return jnp.stack([prev, ctx.pending], axis=1), jnp.stack([ctx.lengths - 1, ctx.lengths], axis=1)


@dataclasses.dataclass(frozen=True)
class DraftModel(_DraftModelBase, ChainDrafter):
    draft_cfg: Config = None
    name = "draft"

    def init(self, params, cfg, batch, cache_size):
        return {"cache": init_cache(self.draft_cfg, batch, cache_size), "policy": self.policy.init(batch)}

    def propose(self, params, state, ctx: StepContext):
        first, positions = self._root_inputs(ctx)
        tree, cache = draft_chain(self._step(params), state["cache"], first, positions, self.policy,
                                  state["policy"], ctx.sampling, ctx.rng)
        return tree, {**state, "cache": cache}, ctx.cache


@dataclasses.dataclass(frozen=True)
class DraftModelTree(_DraftModelBase, Drafter):
    """The draft model grows a dynamic tree (EAGLE-2 expansion and reranking) under a node budget."""

    draft_cfg: Config = None
    tree: DynamicTree = DynamicTree()
    name = "draft_tree"

    @property
    def num_nodes(self) -> int:
        return self.tree.num_nodes

    @property
    def max_depth(self) -> int:
        return self.tree.depth

    def init(self, params, cfg, batch, cache_size):
        # The draft cache also holds the expanded nodes' scratch entries below the tree's nodes.
        return {"cache": init_cache(self.draft_cfg, batch, cache_size + self.tree.num_fed),
                "fed": jnp.full((batch, self.num_nodes), -1, jnp.int32)}

    def propose(self, params, state, ctx: StepContext):
        first, positions = self._root_inputs(ctx)
        cache = state["cache"].replace(lengths=ctx.lengths - 1)
        out = forward(params, self.draft_cfg, first, positions, cache,
                      logits_at=jnp.ones((first.shape[0], 1), jnp.int32))
        base = ctx.lengths + 1  # committed draft entries: the prompt, the accepted tokens, the pending one

        def tree_step(cache, tokens, positions, tree_mask):
            o = forward(params, self.draft_cfg, tokens, positions, cache.replace(lengths=base), tree_mask)
            return o.logits, o.cache

        tree, fed, cache = draft_dynamic_tree(tree_step, out.cache, out.logits[:, 0], ctx.lengths, self.tree,
                                              ctx.sampling, ctx.rng)
        return tree, {"cache": cache, "fed": fed}, ctx.cache

    def observe(self, params, state, result: StepResult):
        # Move the draft entries of the accepted nodes (all but the last, which the next step
        # re-feeds as its `prev`) from their scratch slots to their positions.
        a = result.num_accepted
        nodes = jnp.maximum(result.path[:, 1:] - 1, 0)
        offsets = jnp.take_along_axis(state["fed"], nodes, axis=1)
        base = result.lengths - a  # = old lengths + 1
        num = jnp.where(result.active, jnp.maximum(a - 1, 0), 0)
        cache = commit(state["cache"].replace(lengths=base), offsets, num)
        return {**state, "cache": cache}
