"""`hydra`: Hydra draft heads (Ankner et al. 2024, "Hydra: Sequentially-Dependent Draft Heads for Medusa
Decoding"), with Hydra++'s prefix layer as an option.

Like Medusa's heads (`medusa.py`), K light heads read the target's last hidden state h_t: the residual stream
after the last layer at the token t whose logits gave the pending token x_{t+1}; head k (0-based) drafts depth
k+1 of the tree, the token x_{t+2+k}. Unlike Medusa's, a Hydra head is *sequentially dependent*: it also reads
the tokens before the one it drafts, along its own branch. Head k's input is the concatenation

    c_k = [final_norm(h_t), E(x_{t+1}), E(x'_{t+2}), ..., E(x'_{t+1+k})]        ((k+2) E features)

of the final-normed hidden state and the target's frozen input embeddings E of the pending token and of the k
tokens x' drafted before it on the branch. Each head is Hydra's MLP: a first residual block that also projects
the input down to E features, x = c P_k + SiLU(c W_k + b_k) (the reference's "grounded" block, with its own
residual projection P_k), then `head_layers - 1` residual blocks x + SiLU(x W + b); the target's own frozen LM
head reads it out (or a reduced draft vocabulary, `vocab.py`). P_k starts as the identity on the hidden-state
block and zero on the embedding blocks, every W and b at zero, so an untrained head drafts what the LM head
predicts at h_t, as Medusa's zero initialisation does: legal and lossless, rarely accepted.

Hydra++ adds a prefix layer (`prefix_layer`): one more decoder layer of the target's own form, with its own
weights and KV cache, run over the target's last hidden states; the heads read its output at t instead of h_t,
so they see the whole context through one more attention. Here it continues the target's residual stream (the
target's final norm follows it, as it follows h_t without it; the reference feeds it final-normed states and
gives it a norm of its own) and its two output projections start at zero, so it starts as the identity and an
untrained Hydra++ drafts what Hydra does.

Drafts fill a static tree of rank paths (Medusa's choice lists, `medusa.TREE_NAMES`) level by level: at depth
d, head d-1 runs once for each node of depth d-1 that has children (the root at depth 1), on the tokens of
that node's own path, all of the level's parents in one call; node (..., r) holds the rank-r token of its
parent's head output. Siblings come from one top-k, so they are distinct; drafts are deterministic (verified
greedily or with the point-mass rule), and the tree is prunable by `--budget N|auto`. Every parent pays an
LM-head readout, so the tree's internal nodes set the drafting cost: `sim_16` (the default) reads out 5 times
a step, `mc_sim_7b_63` 22 times; a reduced `--draft-vocab` makes each readout cheap.

Training (`hydra_loss`) teacher-forces the heads' inputs with the true tokens and by default uses Hydra's
teacher loss: cross-entropy against the target's own next-token distribution at the label's position rather
than against the label alone.

The drafter's state is the hidden state the heads read: h_t, set in `prefill` from the last prompt position and
in `observe` from the slot of the last accepted node (as Medusa's). With a prefix layer the state also holds
the layer's KV cache and the hidden states of the positions accepted in the last step ("fresh"): `observe`
keeps them and the next `propose` feeds them to the layer (which needs the target's config, which only
`propose` is handed), commits them, and reads the layer's output at the last one. Trained heads travel as the
drafter's `weights`: {"head_k": {"proj": [(k+2)E, E], "kernel": [(k+2)E, E], "bias": [E], "blocks": {"kernel":
[L-1, E, E], "bias": [L-1, E]} (when L = head_layers > 1)} for k < K, "prefix": {"layers_0": the target's layer
format} (Hydra++)}, kernels stored [in, out]; `save_heads` / `load_heads` keep them in a directory of their own.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters import head_checkpoints as hc
from spec_jax.drafters import vocab as dv
from spec_jax.drafters.base import PrefillContext, StepContext, StepResult, TemplateDrafter
from spec_jax.drafters.medusa import MEDUSA_TREES, TREE_NAMES, check_heads_tree, tree_paths
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.models import Config, KVCache, embed, final_norm, forward_embeddings, head, init_cache, lm_head
from spec_jax.models.llama import DecoderLayer
from spec_jax.trees import TreeTemplate

HEAD_TYPE = "hydra"
heads_meta = hc.heads_meta
DEFAULT_TREE = "sim_16"
CONFIG_FIELDS = {"num_heads": int, "head_layers": int, "prefix_layer": bool}  # a checkpoint's own settings
_PREFIX_OUTPUTS = (("self_attn", "o_proj"), ("mlp", "down_proj"))  # zero: the prefix layer starts as the identity


# ----------------------------------------------------------------------------- parameter shapes

def prefix_config(cfg: Config) -> Config:
    """The prefix layer's config: one decoder layer of the target's form."""
    return cfg.replace(num_layers=1)


def _layer_inputs(cfg: Config):
    """Dummy inputs of one `DecoderLayer` call (one token, a one-slot cache), to initialise it."""
    x = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
    kv = jnp.zeros((1, 1, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
    return x, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1), bool), kv, kv, jnp.zeros((1,), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _init_layer(cfg: Config, rng: jax.Array) -> dict:
    """Random float32 parameters of one decoder layer in the target's layer format (`llama.DecoderLayer`)."""
    layer_cfg = prefix_config(cfg).replace(dtype="float32")
    return nn.unbox(DecoderLayer(layer_cfg).init(rng, *_layer_inputs(layer_cfg))["params"])


@functools.lru_cache(maxsize=16)
def _prefix_shapes(cfg: Config) -> dict:
    return jax.tree.map(lambda x: tuple(x.shape), jax.eval_shape(lambda: _init_layer(cfg, jax.random.key(0))))


def param_shapes(cfg: Config, num_heads: int, head_layers: int = 1, prefix_layer: bool = False) -> dict:
    """The nested shapes of Hydra parameters for model `cfg` (see the module docstring)."""
    E = cfg.hidden_size
    out: dict = {}
    for k in range(num_heads):
        out[f"head_{k}"] = {"proj": ((k + 2) * E, E), "kernel": ((k + 2) * E, E), "bias": (E,)}
        if head_layers > 1:
            out[f"head_{k}"]["blocks"] = {"kernel": (head_layers - 1, E, E), "bias": (head_layers - 1, E)}
    if prefix_layer:
        out["prefix"] = {"layers_0": _prefix_shapes(cfg)}
    return out


def head_settings(params: Mapping) -> tuple[int, int, bool]:
    """(num_heads, head_layers, prefix_layer) of a Hydra parameter tree, read from its structure."""
    names = sorted(k for k in params if k.startswith("head_"))
    K = len(names)
    if K < 1 or names != sorted(f"head_{k}" for k in range(K)):
        raise InvalidArgumentError(f"hydra parameters need heads head_0 .. head_{{K-1}}, got {sorted(params)}")
    blocks = params["head_0"].get("blocks")
    return K, 1 + (0 if blocks is None else int(np.shape(blocks["kernel"])[0])), "prefix" in params


# ----------------------------------------------------------------------------- the heads (pure functions)

def init_heads(cfg: Config, num_heads: int, rng: jax.Array | None = None, *, head_layers: int = 1,
               prefix_layer: bool = False, scale: float = 0.0, mesh=None) -> dict:
    """Hydra parameters (float32): each head's projection the identity on the hidden-state block and zero on the
    embedding blocks, every residual block zero (an untrained head drafts what the LM head predicts at h_t);
    with `prefix_layer`, a decoder layer whose output projections are zero (the identity; its other weights
    random, from `rng` or key 0, so that training moves them). With `scale` > 0, normal(0, scale) draws from
    `rng` are added to every head weight and the prefix layer's kernels are drawn normal(0, scale) (tests).
    Placed replicated on `mesh` when given."""
    if num_heads < 1 or head_layers < 1:
        raise InvalidArgumentError(f"Hydra needs at least one head of at least one layer, got {num_heads} heads "
                                   f"of {head_layers} layers")
    if scale and rng is None:
        raise InvalidArgumentError("init_heads: random heads (scale > 0) need an rng key")
    rng = jax.random.key(0) if rng is None else rng
    E = cfg.hidden_size
    shapes = param_shapes(cfg, num_heads, head_layers)
    params = jax.tree.map(lambda s: np.zeros(s, np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))
    for k in range(num_heads):
        params[f"head_{k}"]["proj"][:E] = np.eye(E, dtype=np.float32)
    k_heads, k_prefix = jax.random.split(rng)
    if scale:  # one draw for every leaf
        leaves, treedef = jax.tree.flatten(params)
        noise = np.split(np.asarray(jax.random.normal(k_heads, (sum(x.size for x in leaves),))),
                         np.cumsum([x.size for x in leaves])[:-1])
        params = jax.tree.unflatten(treedef, [x + scale * z.reshape(x.shape)
                                              for x, z in zip(leaves, noise, strict=True)])
    if prefix_layer:
        layer = jax.tree.map(np.asarray, _init_layer(cfg, k_prefix))
        if scale:  # every kernel normal(0, scale) (the initialiser draws 0.02)
            layer = jax.tree.map(lambda x: x * (scale / 0.02) if x.ndim == 2 else x, layer)
        else:
            for module, proj in _PREFIX_OUTPUTS:
                layer[module][proj]["kernel"] = np.zeros_like(layer[module][proj]["kernel"])
        params["prefix"] = {"layers_0": layer}
    return hc.place(params, mesh)


def head_features(head_params, normed_xE: jax.Array, embeds_xJxE: jax.Array) -> jax.Array:
    """[..., E]: one Hydra head's MLP on [normed hidden state, J input embeddings] (head k reads J = k + 1):
    c P + SiLU(c W + b), then each further residual block x + SiLU(x W + b)."""
    E, J = normed_xE.shape[-1], embeds_xJxE.shape[-2]
    if head_params["proj"].shape[0] != (J + 1) * E:
        raise InvalidArgumentError(f"a hydra head with input {head_params['proj'].shape[0]} features was given "
                                   f"{J} embeddings of width {E} (head k reads k + 1)")
    dt = normed_xE.dtype
    c = jnp.concatenate([normed_xE, embeds_xJxE.reshape(*embeds_xJxE.shape[:-2], J * E).astype(dt)], axis=-1)
    x = c @ head_params["proj"].astype(dt) + jax.nn.silu(c @ head_params["kernel"].astype(dt)
                                                         + head_params["bias"].astype(dt))
    blocks = head_params.get("blocks")
    for i in range(0 if blocks is None else blocks["kernel"].shape[0]):
        x = x + jax.nn.silu(x @ blocks["kernel"][i].astype(dt) + blocks["bias"][i].astype(dt))
    return x


def head_logits(head_params, target_params, cfg: Config, normed_xE: jax.Array, embeds_xJxE: jax.Array,
                vocab: dict | None = None) -> jax.Array:
    """Float32 logits [..., V] of one head (`head_features`) through the target's frozen LM head; with a reduced
    `vocab` (`vocab.reduced_vocab`), [..., Vd] over its tokens only."""
    x = head_features(head_params, normed_xE, embeds_xJxE)
    return lm_head(target_params, cfg, x) if vocab is None else dv.vocab_logits(vocab, x)


def prefix_hidden(prefix_params, cfg: Config, hidden_BxTxE: jax.Array, positions_BxT: jax.Array,
                  cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The prefix layer's output [B, T, E] (a residual stream, before the target's final norm) over the target's
    last hidden states at `positions`, attending to the committed entries of `cache` and causally among the new
    ones; and the cache with their K/V written after `cache.lengths` (not committed: set the lengths)."""
    out = forward_embeddings(prefix_params, prefix_config(cfg), hidden_BxTxE, positions_BxT, cache,
                             compute_logits=False)
    return out.final_hidden, out.cache


def _row_prefix(prefix_params, cfg: Config, hidden_BxLxE: jax.Array) -> jax.Array:
    """The prefix layer over whole rows, causally (training)."""
    B, L, _ = hidden_BxLxE.shape
    positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
    return prefix_hidden(prefix_params, cfg, hidden_BxLxE, positions_BxL, init_cache(prefix_config(cfg), B, L))[0]


# ----------------------------------------------------------------------------- training

def _window_inputs(params, target_params, cfg: Config, hidden_BxLxE, tokens_BxL, starts_BxW, K: int):
    """(normed states [B, W, E] the heads read at each start t, embeddings [B, W, K, E] of x_{t+1..t+K})."""
    B, L, _ = hidden_BxLxE.shape
    base_BxLxE = _row_prefix(params["prefix"], cfg, hidden_BxLxE) if "prefix" in params else hidden_BxLxE
    t_BxW = jnp.clip(starts_BxW, 0, L - 1)
    normed_BxWxE = final_norm(target_params, cfg, jnp.take_along_axis(base_BxLxE, t_BxW[..., None], axis=1))
    at_BxWxK = jnp.clip(starts_BxW[..., None] + 1 + jnp.arange(K), 0, L - 1)
    ids_BxWxK = jnp.take_along_axis(tokens_BxL, at_BxWxK.reshape(B, -1), axis=1).reshape(at_BxWxK.shape)
    return normed_BxWxE, embed(target_params, cfg, ids_BxWxK)


def _labels(tokens_BxL, mask_BxL, starts_BxW, k: int):
    """Head k's labels x_{t+2+k} [B, W] and where they count: a real start, inside the row, an answer token."""
    L = tokens_BxL.shape[1]
    at_BxW = starts_BxW + 2 + k
    safe_BxW = jnp.clip(at_BxW, 0, L - 1)
    valid_BxW = (starts_BxW >= 0) & (at_BxW < L) & jnp.take_along_axis(mask_BxL.astype(bool), safe_BxW, axis=1)
    return jnp.take_along_axis(tokens_BxL, safe_BxW, axis=1), valid_BxW


def hydra_loss(params, target_params, cfg: Config, hidden_BxLxE: jax.Array, tokens_BxL: jax.Array,
               mask_BxL: jax.Array, starts_BxW: jax.Array, weights: Sequence[float] | jax.Array | None = None,
               teacher: bool = True):
    """(weighted loss, per-head losses [K]) of Hydra heads on whole rows, scored at the window starts.

    `hidden_BxLxE[b, t]` is the target's last hidden state after reading `tokens_BxL[b, t]` (its LM head predicts
    t+1), `mask_BxL` marks the answer tokens, `starts_BxW` the positions t where the heads are scored (a negative
    start scores nothing: padding). At a start t, head k reads the state at t (after the prefix layer, run
    causally over the whole row, when `params` has one) and the true tokens x_{t+1..t+1+k} (teacher forcing),
    and is scored on x_{t+2+k} where the row has it and `mask_BxL` holds there. With `teacher` (Hydra's teacher
    loss), its cross-entropy is against the target's own distribution there, softmax(lm_head(final_norm(hidden
    at t+1+k))), the logits that predicted x_{t+2+k}; otherwise against the token. The loss is sum_k weights[k] *
    loss_k, `weights` defaulting to 0.8**k (Medusa's lambda_k); a head with nothing to score scores 0. The LM
    head runs only at the starts, one head at a time.
    """
    K = head_settings(params)[0]
    weights_K = jnp.asarray([0.8**k for k in range(K)] if weights is None else weights, jnp.float32)
    if weights_K.shape != (K,):
        raise InvalidArgumentError(f"hydra_loss: {K} heads need {K} loss weights, got shape {weights_K.shape}")
    L = hidden_BxLxE.shape[1]
    normed_BxWxE, embeds_BxWxKxE = _window_inputs(params, target_params, cfg, hidden_BxLxE, tokens_BxL,
                                                  starts_BxW, K)
    losses = []
    for k in range(K):  # one head at a time: only one [B, W, V] of logits alive at once
        logits_BxWxV = head_logits(params[f"head_{k}"], target_params, cfg, normed_BxWxE, embeds_BxWxKxE[:, :, :k + 1])
        labels_BxW, valid_BxW = _labels(tokens_BxL, mask_BxL, starts_BxW, k)
        lse_BxW = jax.nn.logsumexp(logits_BxWxV, axis=-1)
        if teacher:  # Hydra's teacher loss: the target's distribution at the label's position
            prev_BxW = jnp.clip(starts_BxW + 1 + k, 0, L - 1)
            h_BxWxE = jnp.take_along_axis(hidden_BxLxE, prev_BxW[..., None], axis=1)
            p_BxWxV = jax.lax.stop_gradient(jax.nn.softmax(head(target_params, cfg, h_BxWxE), axis=-1))
            ce_BxW = lse_BxW - jnp.sum(p_BxWxV * logits_BxWxV, axis=-1)
        else:
            ce_BxW = lse_BxW - jnp.take_along_axis(logits_BxWxV, labels_BxW[..., None], axis=-1)[..., 0]
        m_BxW = valid_BxW.astype(jnp.float32)
        losses.append(jnp.sum(ce_BxW * m_BxW) / jnp.maximum(jnp.sum(m_BxW), 1.0))
    per_head_K = jnp.stack(losses)
    return jnp.sum(weights_K * per_head_K), per_head_K


@functools.partial(jax.jit, static_argnums=2)
def _top1_hits(params, target_params, cfg: Config, hidden_BxLxE, tokens_BxL, mask_BxL, starts_BxW):
    """(hits, valid), [B, W, K] each: head k's top-1, fed the true tokens, equals x_{t+2+k} where that counts."""
    K = head_settings(params)[0]
    normed_BxWxE, embeds_BxWxKxE = _window_inputs(params, target_params, cfg, hidden_BxLxE, tokens_BxL,
                                                  starts_BxW, K)
    hits, valid = [], []
    for k in range(K):
        logits_BxWxV = head_logits(params[f"head_{k}"], target_params, cfg, normed_BxWxE, embeds_BxWxKxE[:, :, :k + 1])
        labels_BxW, valid_BxW = _labels(tokens_BxL, mask_BxL, starts_BxW, k)
        hits.append((jnp.argmax(logits_BxWxV, axis=-1) == labels_BxW) & valid_BxW)
        valid.append(valid_BxW)
    return jnp.stack(hits, axis=-1), jnp.stack(valid, axis=-1)


def hydra_acceptance(params, target_params, cfg: Config, batch: Mapping) -> dict:
    """Simulated acceptance on held-out windows (a `hydra_loss` batch: "hidden", "tokens", "mask", "starts"):
    `sim_tau`, the mean run of consecutive hits of the greedy chain of the heads' first choices plus one (the
    pending token given), and `head_top1`, head k's top-1 accuracy fed the true tokens.

    Decoding feeds each head the previous heads' own top-1 tokens; along a run of hits those are the true tokens,
    so the chain's run is the run of the teacher-forced hits, and `head_top1[k]` is also the chain's acceptance
    rate at depth k+1 given that it got there (for a Medusa head, which reads no tokens, the two coincide too).
    """
    hits_BxWxK, valid_BxWxK = (np.asarray(x) for x in _top1_hits(
        params, target_params, cfg, *(jnp.asarray(batch[k]) for k in ("hidden", "tokens", "mask", "starts"))))
    real = np.asarray(batch["starts"]) >= 0
    hits_NxK, valid_NxK = hits_BxWxK[real], valid_BxWxK[real]
    run_N = np.cumprod(hits_NxK, axis=1).sum(axis=1)
    K = hits_NxK.shape[1]
    return {"sim_tau": float(1 + run_N.mean()) if run_N.size else 1.0,
            "head_top1": [float(hits_NxK[:, k].sum() / max(valid_NxK[:, k].sum(), 1)) for k in range(K)]}


# ----------------------------------------------------------------------------- the drafter

class _Level(NamedTuple):
    """How depth d of a template is drafted: head d-1 runs on each of the level's M parents' paths."""

    lo: int  # the level's nodes are lo..hi-1 (breadth-first order)
    hi: int
    paths_MxJ: np.ndarray  # node indices of each parent's path (depths 1..d-1; J = d-1, empty for the root)
    slot_n: np.ndarray  # each node's parent, as an index into the M parents
    rank_n: np.ndarray  # each node's rank under its parent
    top: int  # top-k taken of every parent's head output: the level's largest rank + 1


@functools.lru_cache(maxsize=64)
def _levels(paths: tuple[tuple[int, ...], ...]) -> tuple[_Level, ...]:
    tmpl = TreeTemplate(paths)
    index = {p: i for i, p in enumerate(tmpl.paths)}
    levels = []
    for d in range(1, tmpl.max_depth + 1):
        nodes = [p for p in tmpl.paths if len(p) == d]
        parents = sorted({p[:-1] for p in nodes}, key=lambda p: index.get(p, -1))
        paths_MxJ = np.array([[index[p[:j]] for j in range(1, d)] for p in parents], np.int32)
        paths_MxJ = paths_MxJ.reshape(len(parents), d - 1)  # (1, 0) for the root
        levels.append(_Level(lo=index[nodes[0]], hi=index[nodes[-1]] + 1, paths_MxJ=paths_MxJ,
                             slot_n=np.array([parents.index(p[:-1]) for p in nodes], np.int32),
                             rank_n=np.array([p[-1] for p in nodes], np.int32), top=max(p[-1] for p in nodes) + 1))
    return tuple(levels)


@dataclasses.dataclass(frozen=True)
class Hydra(TemplateDrafter):
    """K sequentially dependent Hydra heads fill a static tree of rank paths, level by level (head d-1 fills
    depth d); with `prefix_layer` (Hydra++) the heads read a decoder layer's output over the hidden states."""

    num_heads: int = 4
    head_layers: int = 1
    prefix_layer: bool = False
    paths: tuple[tuple[int, ...], ...] = MEDUSA_TREES[DEFAULT_TREE]
    name = "hydra"
    prunable = True

    def __post_init__(self):
        if self.num_heads < 1 or self.head_layers < 1 or not self.paths:
            raise InvalidArgumentError(f"hydra needs at least one head of at least one layer and a non-empty tree, "
                                       f"got {self.num_heads} heads of {self.head_layers} layers and "
                                       f"{len(self.paths)} paths")
        depth = max(len(p) for p in self.paths)
        if depth > self.num_heads:
            raise InvalidArgumentError(f"hydra tree is {depth} levels deep but there are only {self.num_heads} "
                                       "heads (head d-1 drafts depth d)")

    @property
    def template(self) -> TreeTemplate:
        return TreeTemplate(self.paths)

    def with_template(self, template: TreeTemplate) -> Hydra:
        return dataclasses.replace(self, paths=template.paths)

    def check(self, cfg: Config, weights, carry) -> None:
        if not isinstance(weights, Mapping):
            raise TypeError("the hydra drafter needs head weights {'head_0', ...} (init_heads or load_heads), "
                            "and 'vocab' for a reduced draft vocabulary")
        heads = {k: v for k, v in weights.items() if k != "vocab"}
        got = {k: tuple(np.shape(v)) for k, v in hc.flat_names(heads).items()}
        want = hc.flat_names(param_shapes(cfg, self.num_heads, self.head_layers, self.prefix_layer))
        if got != want:
            diff = sorted(set(got.items()) ^ set(want.items()))
            raise InvalidArgumentError(
                f"hydra weights do not fit {self.num_heads} heads of {self.head_layers} layers "
                f"{'with' if self.prefix_layer else 'without'} a prefix layer on this model (hidden size "
                f"{cfg.hidden_size}): {', '.join(f'{k} {s}' for k, s in diff[:4])}")
        top = int(self.template.ranks.max()) + 1
        if top > cfg.vocab_size:
            raise InvalidArgumentError(f"hydra tree uses the top {top} tokens per node but the vocabulary has only "
                                       f"{cfg.vocab_size}")
        dv.check_weights(weights.get("vocab"), cfg, top, self.name)

    def init(self, weights, carry, cfg: Config, batch: int, cache_size: int):
        state = {"hidden_BxE": jnp.zeros((batch, cfg.hidden_size), cfg.jnp_dtype)}
        if self.prefix_layer:
            P = self.template.max_depth + 1  # the accepted path's slots, root included
            state.update(cache=init_cache(prefix_config(cfg), batch, cache_size),
                         fresh_BxPxE=jnp.zeros((batch, P, cfg.hidden_size), cfg.jnp_dtype),
                         fresh_B=jnp.zeros((batch,), jnp.int32))
        return state

    def prefill(self, weights, state, ctx: PrefillContext):
        hidden_BxTxE = ctx.final_hidden_BxTxE
        if self.prefix_layer:  # the prompt through the prefix layer; padding past each prompt stays scratch
            B, T = ctx.prompts_BxT.shape
            cache = state["cache"].replace(lengths=jnp.zeros((B,), jnp.int32))
            hidden_BxTxE, cache = prefix_hidden(weights["prefix"], ctx.cfg, hidden_BxTxE,
                                                jnp.broadcast_to(jnp.arange(T), (B, T)), cache)
            state = {**state, "cache": cache.replace(lengths=ctx.prompt_lens_B)}
        # The last prompt position's logits gave the pending token: heads read that hidden state.
        last_Bx1x1 = (ctx.prompt_lens_B - 1)[:, None, None]
        hidden_BxE = jnp.take_along_axis(hidden_BxTxE, last_Bx1x1, axis=1)[:, 0]
        return {**state, "hidden_BxE": hidden_BxE.astype(state["hidden_BxE"].dtype)}

    def _feed_prefix(self, weights, state, cfg: Config):
        """The state with the last step's accepted positions fed to the prefix layer and committed."""
        cache, fresh_B = state["cache"], state["fresh_B"]
        P = state["fresh_BxPxE"].shape[1]
        positions_BxP = cache.lengths[:, None] + jnp.arange(P)
        out_BxPxE, cache = prefix_hidden(weights["prefix"], cfg, state["fresh_BxPxE"], positions_BxP, cache)
        last_BxE = jnp.take_along_axis(out_BxPxE, jnp.maximum(fresh_B - 1, 0)[:, None, None], axis=1)[:, 0]
        hidden_BxE = jnp.where((fresh_B > 0)[:, None], last_BxE.astype(state["hidden_BxE"].dtype), state["hidden_BxE"])
        return {**state, "cache": cache.replace(lengths=cache.lengths + fresh_B), "hidden_BxE": hidden_BxE,
                "fresh_B": jnp.zeros_like(fresh_B)}

    def propose(self, weights, state, ctx: StepContext):
        if self.prefix_layer:
            state = self._feed_prefix(weights, state, ctx.cfg)
        tmpl, vocab = self.template, weights.get("vocab")
        normed_BxE = final_norm(ctx.target_params, ctx.cfg, state["hidden_BxE"])
        pending_Bx1xE = embed(ctx.target_params, ctx.cfg, ctx.pending_B[:, None])
        tokens_BxN = jnp.zeros((ctx.pending_B.shape[0], tmpl.num_nodes), jnp.int32)
        for d, level in enumerate(_levels(tmpl.paths), start=1):
            # Each parent's input: [normed h_t, E(pending), E(its path's tokens)], all parents of the level at once.
            M = level.paths_MxJ.shape[0]
            path_BxMxJxE = embed(ctx.target_params, ctx.cfg, tokens_BxN[:, level.paths_MxJ])
            root_BxMx1xE = jnp.broadcast_to(pending_Bx1xE[:, None], (path_BxMxJxE.shape[0], M, 1, normed_BxE.shape[-1]))
            embeds_BxMxDxE = jnp.concatenate([root_BxMx1xE, path_BxMxJxE], axis=2)
            normed_BxMxE = jnp.broadcast_to(normed_BxE[:, None], (normed_BxE.shape[0], M, normed_BxE.shape[-1]))
            logits_BxMxV = head_logits(weights[f"head_{d - 1}"], ctx.target_params, ctx.cfg, normed_BxMxE,
                                       embeds_BxMxDxE, vocab)
            top_BxMxR = jax.lax.top_k(logits_BxMxV, level.top)[1].astype(jnp.int32)
            level_Bxn = dv.to_target_ids(vocab, top_BxMxR[:, level.slot_n, level.rank_n])  # parent's rank r
            tokens_BxN = tokens_BxN.at[:, level.lo:level.hi].set(level_Bxn)
        return tmpl.build(tokens_BxN), state, ctx.cache

    def observe(self, weights, state, result: StepResult):
        a_B = result.num_accepted_B
        if self.prefix_layer:  # the accepted path's hidden states, fed to the prefix layer by the next propose
            fresh_BxPxE = jnp.take_along_axis(result.final_hidden_BxTxE, result.path_BxP[..., None], axis=1)
            return {**state, "fresh_BxPxE": fresh_BxPxE.astype(state["fresh_BxPxE"].dtype),
                    "fresh_B": jnp.where(result.active_B, a_B + 1, 0).astype(jnp.int32)}
        # Slot of the deepest accepted node (the root when none was): its logits gave the next pending token.
        last_B = jnp.take_along_axis(result.path_BxP, a_B[:, None], axis=1)[:, 0]
        hidden_BxE = jnp.take_along_axis(result.final_hidden_BxTxE, last_B[:, None, None], axis=1)[:, 0]
        hidden_BxE = jnp.where(result.active_B[:, None], hidden_BxE.astype(state["hidden_BxE"].dtype),
                               state["hidden_BxE"])
        return {**state, "hidden_BxE": hidden_BxE}


# ----------------------------------------------------------------------------- checkpoints

def save_heads(path: str | os.PathLike, head_params, meta: Mapping, ranking_V: np.ndarray | None = None) -> Path:
    """Write Hydra heads as a heads directory (`head_checkpoints.save_heads`), their settings (num_heads,
    head_layers, prefix_layer) in its config; `meta` from `heads_meta(cfg, ...)`. Returns `path`. Stored float16:
    four SmolLM2-sized heads with their (k+2)E-wide inputs are 37 MB in float32."""
    K, layers, prefix = head_settings(head_params)
    E = meta.get("hidden_size")
    for k in range(K):
        if tuple(np.shape(head_params[f"head_{k}"]["proj"])) != ((k + 2) * E, E):
            raise InvalidArgumentError(f"save_heads: head {k}'s projection has shape "
                                       f"{np.shape(head_params[f'head_{k}']['proj'])}, not that of head {k} on a "
                                       f"model of hidden size {E} ({((k + 2) * E, E)})")
    params = {k: v for k, v in head_params.items() if k != "vocab"}
    config = {**meta, "num_heads": K, "head_layers": layers, "prefix_layer": prefix}
    return hc.save_heads(path, HEAD_TYPE, params, config, ranking_V, dtype=np.float16)


def read_heads_config(path: str | os.PathLike, cfg: Config) -> dict:
    """A heads directory's config, refused unless it is Hydra heads for this model. Reads no weights."""
    config = hc.read_heads_config(path, cfg, HEAD_TYPE, CONFIG_FIELDS)
    for field in ("num_heads", "head_layers"):
        if config[field] < 1:
            raise DataFormatError(f"{Path(path) / hc.CONFIG_FILE}: {field} must be a positive integer, got "
                                  f"{config[field]}")
    return config


def load_heads(path: str | os.PathLike, cfg: Config, *, mesh=None) -> dict:
    """Hydra heads saved by `save_heads`, checked against model `cfg` and their own config; float32, placed
    replicated on `mesh` when given."""
    read_heads_config(path, cfg)
    shapes = lambda c: hc.flat_names(param_shapes(cfg, c["num_heads"], c["head_layers"], c["prefix_layer"]))  # noqa: E731
    return hc.load_heads(path, cfg, HEAD_TYPE, shapes, mesh=mesh)[0]


def shipped_heads(cfg: Config) -> Path | None:
    """The Hydra heads shipped with spec-jax for a model of this shape, if any."""
    return hc.shipped_heads(cfg, HEAD_TYPE)


HYDRA_OPTIONS = (
    Option("heads", str, None, "trained draft heads: a directory of config.json + heads.safetensors (save_heads); "
           "default: the heads shipped for this model (spec_jax/heads/), else untrained zero-initialised heads"),
    Option("hydra_heads", int, 4, "number of untrained heads when --heads is not given (a checkpoint brings its "
           "own)", min=1),
    Option("hydra_head_layers", int, 1, "residual blocks per untrained head (a checkpoint brings its own)", min=1),
    Option("prefix_layer", bool, False, "Hydra++: untrained heads read one more decoder layer over the target's "
           "hidden states (a checkpoint brings its own)"),
    Option("hydra_tree", str, DEFAULT_TREE, "static tree shape (Medusa choice list): sim_16 (16 nodes, 3 levels, 5 "
           "head readouts a step), mc_sim_7b_63 (63 nodes, 4 levels, 22 readouts), sim_8, or chain (each head's "
           "top token); prune further with --budget", choices=TREE_NAMES),
    dv.VOCAB_OPTION,
)


def check_hydra(opts, cfg: Config) -> None:
    """`--heads` is Hydra heads for this model and the tree fits them (`medusa.check_heads_tree`)."""
    check_heads_tree(opts, cfg, HEAD_TYPE, read_heads_config, opts.hydra_heads, opts.hydra_tree, "hydra")


@register("hydra", "Hydra: sequentially dependent draft heads (each reads the tokens drafted before it on its "
          "branch) fill a static tree; --prefix-layer for Hydra++ (--heads trained heads; default: those shipped "
          "for the model, else untrained heads)", options=HYDRA_OPTIONS, check=check_hydra, prunable=True)
def build(opts, target) -> Built:
    path = hc.heads_path(opts, target.cfg, HEAD_TYPE)
    if path is not None:
        weights = load_heads(path, target.cfg, mesh=target.mesh)
    else:
        weights = init_heads(target.cfg, opts.hydra_heads, head_layers=opts.hydra_head_layers,
                             prefix_layer=opts.prefix_layer, mesh=target.mesh)
    num_heads, head_layers, prefix = head_settings(weights)
    weights = dv.with_vocab(weights, opts.draft_vocab, target, path)
    drafter = Hydra(num_heads=num_heads, head_layers=head_layers, prefix_layer=prefix,
                    paths=tree_paths(opts.hydra_tree, num_heads))
    return Built(drafter, weights=weights)
