"""`draft` and `draft_tree`: a separate, smaller Llama-family model with the target's tokenizer
drafts a chain (`draft`) or a dynamic tree (`draft_tree`, EAGLE-2-style expansion; see
`dynamic_tree`).

The draft is `--draft-model` (an HF directory, a .gguf file, a short name, or a distilled draft written by
`save_draft`: a few decoder layers that share the target's embeddings, trained by
`spec_jax.training.distill`), else the distilled draft shipped for the target (spec_jax/heads/draft_<model>),
else the target's first `--draft-layers` layers as a stand-in. `--draft-vocab N` reads the drafts out over
the N most frequent tokens of the distilled draft's training data (FR-Spec): the draft's LM head is most of
its cost, and verification stays on the full vocabulary, so decoding stays lossless.

The draft model keeps its own KV cache. Each step it is fed [last committed token, pending token]:
re-feeding the last committed token fills the one entry it never computed when its whole chain was
accepted (Leviathan et al. 2023; the draft never sees its own last draft token otherwise). Chain
drafts sit at their final cache slots already; a tree's accepted path is moved there by `commit`
in `observe`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters import head_checkpoints as hc
from spec_jax.drafters import structure as st
from spec_jax.drafters.base import Drafter, DraftShape, PrefillContext, StepContext, StepResult
from spec_jax.drafters.chain import LENGTH_POLICY, ChainDrafter, draft_chain
from spec_jax.drafters.dynamic_tree import TREE_OPTIONS, DynamicTree, check_tree, draft_dynamic_tree
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.drafters.vocab import (
    VOCAB_OPTION,
    check_option,
    check_weights,
    full_vocab_logits,
    vocab_logits,
    with_vocab,
)
from spec_jax.errors import DataFormatError, InvalidArgumentError, TokenizerMismatchError
from spec_jax.models import Config, commit, final_norm, forward, init_cache, truncate
from spec_jax.policies import make_policy


def _model_params(weights) -> dict:
    """The draft model's parameters without what drafters add to its weights (a reduced vocabulary, a
    draft-structure predictor)."""
    return {k: v for k, v in weights.items() if k not in ("vocab", st.HEAD_TYPE)}


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
        check_weights(weights.get("vocab"), cfg, 1, self.name)

    def _forward(self, weights, tokens_BxT, positions_BxT, cache, tree_mask=None, logits_at=None):
        """(logits [B, K, V] at `logits_at` (every token when None), cache) of the draft model."""
        logits, cache, _ = self._forward_hidden(weights, tokens_BxT, positions_BxT, cache, tree_mask, logits_at)
        return logits, cache

    def _forward_hidden(self, weights, tokens_BxT, positions_BxT, cache, tree_mask=None, logits_at=None):
        """`_forward` and the draft's last hidden state (before the final norm) at the same tokens [B, K, E]; with a
        reduced vocabulary, the tokens outside it get the lowest float32 logit, so drafting never picks them."""
        vocab = weights.get("vocab")
        weights = _model_params(weights)
        out = forward(weights, self.draft_cfg, tokens_BxT, positions_BxT, cache, tree_mask, logits_at=logits_at,
                      compute_logits=vocab is None)
        h = out.final_hidden if logits_at is None else jnp.take_along_axis(out.final_hidden, logits_at[..., None], 1)
        if vocab is None:
            return out.logits, out.cache, h
        small = vocab_logits(vocab, final_norm(weights, self.draft_cfg, h))
        return full_vocab_logits(vocab, small, self.draft_cfg.vocab_size), out.cache, h

    def _step(self, weights):
        def model_step(cache, tokens, positions):
            cache = cache.replace(lengths=positions[:, 0])
            logits, cache = self._forward(weights, tokens, positions, cache,
                                          logits_at=jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32))
            return logits[:, 0], cache
        return model_step

    def prefill(self, weights, state, ctx: PrefillContext):
        # Padding entries past each prompt are scratch, overwritten by later steps.
        B, T = ctx.prompts_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
        out = forward(_model_params(weights), self.draft_cfg, ctx.prompts_BxT, positions_BxT, state["cache"],
                      compute_logits=False)
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
    structure: st.Structure | None = None  # a draft-structure predictor sets each step's depth (weights["structure"])
    name = "draft_tree"

    @property
    def shape(self) -> DraftShape:
        return DraftShape(nodes=self.tree.num_nodes, depth=min(self.tree.depth, self.tree.num_nodes))

    def init(self, weights, carry, cfg, batch, cache_size):
        # The draft cache also holds the expanded nodes' scratch entries below the tree's nodes.
        return {"cache": init_cache(self.draft_cfg, batch, cache_size + self.tree.num_fed),
                "fed": jnp.full((batch, self.tree.num_nodes), -1, jnp.int32)}

    def check(self, cfg: Config, weights, carry) -> None:
        super().check(cfg, weights, carry)
        E = self.draft_cfg.hidden_size
        st.check_weights(self.structure, weights.get(st.HEAD_TYPE), st.input_size(E, E), self.name)

    def _depth_limit(self, weights, pending_B, h_BxE, root_logits_BxV):
        """AdaEAGLE's predicted tree depth [B] from the draft's embedding of the pending token and its last
        hidden state there."""
        from spec_jax.models import embed

        model = _model_params(weights)
        x_BxI = st.structure_inputs(embed(model, self.draft_cfg, pending_B), h_BxE, root_logits_BxV)
        return st.depth_limit(st.predict_accepted(weights[st.HEAD_TYPE], x_BxI), self.structure.margin,
                              self.tree.depth)

    def propose(self, weights, state, ctx: StepContext):
        first_Bx2, positions_Bx2 = self._root_inputs(ctx)
        root_cache = state["cache"].replace(lengths=ctx.committed_B - 1)
        logits, cache, h_Bx1xE = self._forward_hidden(weights, first_Bx2, positions_Bx2, root_cache,
                                                      logits_at=jnp.ones((first_Bx2.shape[0], 1), jnp.int32))
        limit_B = None if self.structure is None else self._depth_limit(weights, first_Bx2[:, 1], h_Bx1xE[:, 0],
                                                                         logits[:, 0])
        base_B = ctx.committed_B + 1  # committed draft entries: the prompt, the accepted tokens, the pending one

        def tree_step(cache, tokens, positions, tree_mask, parent_slots):
            return self._forward(weights, tokens, positions, cache.replace(lengths=base_B), tree_mask)

        tree, fed_BxN, cache = draft_dynamic_tree(tree_step, cache, logits[:, 0], ctx.committed_B,
                                                  self.tree, ctx.sampling, ctx.rng, limit_B)
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

DRAFT_TYPE = "draft"  # the head type of a distilled draft's checkpoint (`save_draft`)
STAND_IN_LAYERS = 8  # the stand-in's layers when no distilled draft ships for the target

DRAFT_OPTIONS = (
    Option("draft_model", str, None, "draft model with the target's tokenizer: a distilled draft directory "
           "(train/train_heads.py with recipe: draft), an HF directory, a .gguf file or a short name; default: "
           "the distilled draft shipped for the target, else its first --draft-layers layers as a stand-in"),
    Option("draft_layers", int, None, f"use the target's first N layers as a stand-in draft model (when "
           f"--draft-model is not given; default {STAND_IN_LAYERS} where no distilled draft ships)", min=1),
    VOCAB_OPTION,
)


def draft_source(opts, cfg: Config) -> tuple[str, object]:
    """Which draft the options name: ("distilled", directory), ("model", name) or ("stand-in", layers)."""
    if opts.draft_model:
        path = Path(opts.draft_model)
        if path.is_dir() and (path / hc.WEIGHTS_FILE).is_file():
            return "distilled", path
        return "model", opts.draft_model
    shipped = hc.shipped_heads(cfg, DRAFT_TYPE) if opts.draft_layers is None else None
    if shipped is not None:
        return "distilled", shipped
    return "stand-in", opts.draft_layers or STAND_IN_LAYERS


def check_draft(opts, cfg) -> None:
    """The draft exists and shares the target's vocabulary (read from its header or config, no weights); a
    stand-in has at most the target's layers; `--draft-vocab` needs a distilled draft's token ranking."""
    from spec_jax.models.registry import load_config

    kind, source = draft_source(opts, cfg)
    if kind == "distilled":
        hc.read_heads_config(source, cfg, DRAFT_TYPE, {"draft_layers": int})
    elif kind == "model":
        dcfg = load_config(source)
        if dcfg.vocab_size != cfg.vocab_size:
            raise TokenizerMismatchError(
                f"--draft-model {source}: its vocabulary has {dcfg.vocab_size} tokens, the target's "
                f"{cfg.vocab_size}; speculative decoding needs a draft model with the target's tokenizer")
    elif source > cfg.num_layers:
        raise InvalidArgumentError(f"--draft-layers {source}: the target has only {cfg.num_layers} "
                                   "layers to take the stand-in draft model from")
    check_option(opts.draft_vocab, cfg, source if kind == "distilled" else None)


def load_draft(opts, target):
    """(draft weights, draft config) of the draft the options name (see `draft_source`)."""
    from spec_jax.models.registry import check_same_tokenizer, load_model, load_tokenizer

    kind, source = draft_source(opts, target.cfg)
    if kind == "distilled":
        return with_vocab(load_distilled(source, target), opts.draft_vocab, target, source), \
            target.cfg.replace(num_layers=hc.read_heads_config(source, target.cfg, DRAFT_TYPE)["draft_layers"])
    if kind == "model":
        weights, dcfg = load_model(source, target.dtype, mesh=target.mesh)
        check_same_tokenizer(target.tokenizer, load_tokenizer(source), target.cfg, dcfg)
        return weights, dcfg
    return truncate(target.params, target.cfg, source)


# ----------------------------------------------------------------------------- distilled drafts on disk

def share_embeddings(draft_params, target_params, cfg: Config) -> dict:
    """A distilled draft's full parameters: its layers and norm with the target's embeddings (and LM head)."""
    shared = {k: target_params[k] for k in ("embed_tokens", "lm_head") if k in target_params}
    return {**draft_params, **shared}


def draft_layers_params(params) -> dict:
    """What a distilled draft owns (its decoder layers and final norm): what `save_draft` writes."""
    return {k: v for k, v in params.items() if k.startswith("layers_") or k == "norm"}


def save_draft(path: str | os.PathLike, params, meta: dict, ranking_V: np.ndarray | None = None,
               tokenizer=None) -> Path:
    """Write a distilled draft (float16; the embeddings are the target's, not stored) with the target's
    tokenizer fingerprint, so a draft is refused for a target whose tokenizer maps tokens differently."""
    from spec_jax.models.registry import tokenizer_fingerprint

    own = draft_layers_params(params)
    n = sum(k.startswith("layers_") for k in own)
    extra = {"draft_layers": n} | ({"tokenizer_sha256": tokenizer_fingerprint(tokenizer)} if tokenizer else {})
    return hc.save_heads(path, DRAFT_TYPE, own, {**meta, **extra}, ranking_V, dtype=np.float16)


def load_distilled(path: str | os.PathLike, target) -> dict:
    """A distilled draft's parameters (with the target's shared embeddings), checked against the target's
    shape and tokenizer before any weights are read."""
    from spec_jax.models.registry import tokenizer_fingerprint

    cfg = target.cfg
    config = hc.read_heads_config(path, cfg, DRAFT_TYPE, {"draft_layers": int})
    want = config.get("tokenizer_sha256")
    if want and target.tokenizer is not None and want != tokenizer_fingerprint(target.tokenizer):
        raise TokenizerMismatchError(f"{path}: this draft was distilled for a model whose tokenizer maps tokens to "
                                     "other ids; distill a draft for this model (train/train_heads.py, recipe: draft)")
    if not 1 <= config["draft_layers"] <= 64:
        raise DataFormatError(f"{path}: draft_layers must be in [1, 64], got {config['draft_layers']}")
    layer = {k: tuple(np.shape(v)) for k, v in hc.flat_names(target.params["layers_0"]).items()}
    norm = {f"norm.{k}": tuple(np.shape(v)) for k, v in hc.flat_names(target.params["norm"]).items()}

    def shapes(c):
        return {f"layers_{i}.{k}": s for i in range(c["draft_layers"]) for k, s in layer.items()} | norm

    params, _ = hc.load_heads(path, cfg, DRAFT_TYPE, shapes, mesh=target.mesh)
    params = jax.tree.map(lambda x: x.astype(cfg.jnp_dtype), params)
    return share_embeddings(params, target.params, cfg)


def export_draft(opts, target, out_dir: str | os.PathLike) -> Path:
    """The draft the options name as an HF directory (with the target's tokenizer) that transformers loads:
    what `hf_assisted` runs, so both sides draft with the same model."""
    from spec_jax.models.loading import export_hf

    weights, dcfg = load_draft(SimpleNamespace(**{**vars(opts), "draft_vocab": 0}), target)
    return export_hf(_model_params(weights), dcfg, out_dir, target.tokenizer)


@register("draft", "a separate draft model (same tokenizer) drafts a chain; adaptive length policies",
          options=(*DRAFT_OPTIONS, Option("draft_k", int, 5, "maximum draft length", min=1), LENGTH_POLICY),
          check=check_draft)
def build_draft(opts, target) -> Built:
    weights, dcfg = load_draft(opts, target)
    return Built(DraftModel(draft_cfg=dcfg, policy=make_policy(opts.length_policy, opts.draft_k)), weights=weights)


def _check_draft_tree(opts, cfg) -> None:
    check_tree(opts)
    check_draft(opts, cfg)
    st.check_option(opts, cfg, "draft_tree")


@register("draft_tree", "the draft model grows a dynamic tree (EAGLE-2 expansion and reranking)",
          options=(*DRAFT_OPTIONS, *TREE_OPTIONS, *st.STRUCTURE_OPTIONS), check=_check_draft_tree)
def build_draft_tree(opts, target) -> Built:
    weights, dcfg = load_draft(opts, target)
    structure, weights = st.with_structure(opts, target, "draft_tree", weights)
    tree = DynamicTree(depth=opts.tree_depth, width=opts.tree_width, k=opts.tree_k, budget=opts.tree_budget,
                       sampled=opts.sampled_children)
    return Built(DraftModelTree(draft_cfg=dcfg, tree=tree, structure=structure), weights=weights)
