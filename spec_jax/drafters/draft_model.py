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

from spec_jax.drafters.base import Drafter, DraftShape, PrefillContext, StepContext, StepResult
from spec_jax.drafters.chain import LENGTH_POLICY, ChainDrafter, draft_chain
from spec_jax.drafters.dynamic_tree import TREE_OPTIONS, DynamicTree, check_tree, draft_dynamic_tree
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import InvalidArgumentError, TokenizerMismatchError
from spec_jax.models import Config, commit, forward, init_cache, truncate
from spec_jax.policies import make_policy


class _DraftModelBase:
    """What both draft-model drafters share: the checks, the cache and the prompt prefill."""

    draft_cfg: Config

    def check(self, cfg: Config, weights, carry) -> None:
        if self.draft_cfg is None or weights is None:
            raise TypeError("the draft-model drafter needs draft_cfg and draft params")
        if self.draft_cfg.vocab_size != cfg.vocab_size:
            raise TokenizerMismatchError(
                f"draft vocabulary size {self.draft_cfg.vocab_size} != target's {cfg.vocab_size}; "
                "the draft model must use the target's tokenizer")

    def _step(self, weights):
        def model_step(cache, tokens, positions):
            cache = cache.replace(lengths=positions[:, 0])
            out = forward(weights, self.draft_cfg, tokens, positions, cache,
                          logits_at=jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32))
            return out.logits[:, 0], out.cache
        return model_step

    def prefill(self, weights, state, ctx: PrefillContext):
        # Padding entries past each prompt are scratch, overwritten by later steps.
        B, T = ctx.prompts_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
        out = forward(weights, self.draft_cfg, ctx.prompts_BxT, positions_BxT, state["cache"], compute_logits=False)
        return {**state, "cache": out.cache}

    @staticmethod
    def _root_inputs(ctx: StepContext):
        """[last committed token, pending token] and their positions."""
        prev_B = jnp.take_along_axis(ctx.tokens_BxS, (ctx.committed_B - 1)[:, None], axis=1)[:, 0]
        return (jnp.stack([prev_B, ctx.pending_B], axis=1),
                jnp.stack([ctx.committed_B - 1, ctx.committed_B], axis=1))


@dataclasses.dataclass(frozen=True)
class DraftModel(_DraftModelBase, ChainDrafter):
    draft_cfg: Config = None
    name = "draft"

    def init(self, weights, carry, cfg, batch, cache_size):
        return {"cache": init_cache(self.draft_cfg, batch, cache_size), "policy": self.policy.init(batch)}

    def propose(self, weights, state, ctx: StepContext):
        first, positions = self._root_inputs(ctx)
        tree, cache = draft_chain(self._step(weights), state["cache"], first, positions, self.policy,
                                  state["policy"], ctx.sampling, ctx.rng)
        return tree, {**state, "cache": cache}, ctx.cache


@dataclasses.dataclass(frozen=True)
class DraftModelTree(_DraftModelBase, Drafter):
    """The draft model grows a dynamic tree (EAGLE-2 expansion and reranking) under a node budget."""

    draft_cfg: Config = None
    tree: DynamicTree = DynamicTree()
    name = "draft_tree"

    @property
    def shape(self) -> DraftShape:
        return DraftShape(nodes=self.tree.num_nodes, depth=min(self.tree.depth, self.tree.num_nodes))

    def init(self, weights, carry, cfg, batch, cache_size):
        # The draft cache also holds the expanded nodes' scratch entries below the tree's nodes.
        return {"cache": init_cache(self.draft_cfg, batch, cache_size + self.tree.num_fed),
                "fed": jnp.full((batch, self.tree.num_nodes), -1, jnp.int32)}

    def propose(self, weights, state, ctx: StepContext):
        first_Bx2, positions_Bx2 = self._root_inputs(ctx)
        cache = state["cache"].replace(lengths=ctx.committed_B - 1)
        out = forward(weights, self.draft_cfg, first_Bx2, positions_Bx2, cache,
                      logits_at=jnp.ones((first_Bx2.shape[0], 1), jnp.int32))
        base_B = ctx.committed_B + 1  # committed draft entries: the prompt, the accepted tokens, the pending one

        def tree_step(cache, tokens, positions, tree_mask, parent_slots):
            o = forward(weights, self.draft_cfg, tokens, positions, cache.replace(lengths=base_B), tree_mask)
            return o.logits, o.cache

        tree, fed_BxN, cache = draft_dynamic_tree(tree_step, out.cache, out.logits[:, 0], ctx.committed_B,
                                                  self.tree, ctx.sampling, ctx.rng)
        return tree, {"cache": cache, "fed": fed_BxN}, ctx.cache

    def observe(self, weights, state, result: StepResult):
        # Move the draft entries of the accepted nodes (all but the last, which the next step
        # re-feeds as its `prev`) from their scratch slots to their positions.
        a_B = result.num_accepted_B
        nodes_BxD = jnp.maximum(result.path_BxP[:, 1:] - 1, 0)
        offsets_BxD = jnp.take_along_axis(state["fed"], nodes_BxD, axis=1)
        base_B = result.committed_before_B + 1
        num_B = jnp.where(result.active_B, jnp.maximum(a_B - 1, 0), 0)
        cache = commit(state["cache"].replace(lengths=base_B), offsets_BxD, num_B)
        return {**state, "cache": cache}


# ----------------------------------------------------------------------------- registry

DRAFT_OPTIONS = (
    Option("draft_model", str, None, "draft model (short name, HF directory or .gguf) with the target's "
           "tokenizer; default: the target's first --draft-layers layers as a stand-in"),
    Option("draft_layers", int, 8, "layers of the stand-in draft model (when --draft-model is not given)", min=1),
)


def check_draft(opts, cfg) -> None:
    """`--draft-model` exists and shares the target's vocabulary (read from its header); a stand-in has at
    most the target's layers."""
    from spec_jax.models.registry import load_config

    if opts.draft_model:
        dcfg = load_config(opts.draft_model)
        if dcfg.vocab_size != cfg.vocab_size:
            raise TokenizerMismatchError(
                f"--draft-model {opts.draft_model}: its vocabulary has {dcfg.vocab_size} tokens, the target's "
                f"{cfg.vocab_size}; speculative decoding needs a draft model with the target's tokenizer")
    elif opts.draft_layers > cfg.num_layers:
        raise InvalidArgumentError(f"--draft-layers {opts.draft_layers}: the target has only {cfg.num_layers} "
                                   "layers to take the stand-in draft model from")


def load_draft(opts, target):
    """(draft weights, draft config): `--draft-model`, or the target's first `--draft-layers` layers."""
    from spec_jax.models.registry import check_same_tokenizer, load_model, load_tokenizer

    if opts.draft_model:
        weights, dcfg = load_model(opts.draft_model, target.dtype, mesh=target.mesh)
        check_same_tokenizer(target.tokenizer, load_tokenizer(opts.draft_model), target.cfg, dcfg)
        return weights, dcfg
    return truncate(target.params, target.cfg, opts.draft_layers)


@register("draft", "a separate draft model (same tokenizer) drafts a chain; adaptive length policies",
          options=(*DRAFT_OPTIONS, Option("draft_k", int, 5, "maximum draft length", min=1), LENGTH_POLICY),
          check=check_draft)
def build_draft(opts, target) -> Built:
    weights, dcfg = load_draft(opts, target)
    return Built(DraftModel(draft_cfg=dcfg, policy=make_policy(opts.length_policy, opts.draft_k)), weights=weights)


def _check_draft_tree(opts, cfg) -> None:
    check_tree(opts)
    check_draft(opts, cfg)


@register("draft_tree", "the draft model grows a dynamic tree (EAGLE-2 expansion and reranking)",
          options=(*DRAFT_OPTIONS, *TREE_OPTIONS), check=_check_draft_tree)
def build_draft_tree(opts, target) -> Built:
    weights, dcfg = load_draft(opts, target)
    tree = DynamicTree(depth=opts.tree_depth, width=opts.tree_width, k=opts.tree_k, budget=opts.tree_budget,
                       sampled=opts.sampled_children)
    return Built(DraftModelTree(draft_cfg=dcfg, tree=tree), weights=weights)
