"""`medusa`: Medusa draft heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads").

K light heads read the target's last hidden state h_t: the residual stream after the last layer at the
token t whose logits gave the pending token (position t+1). Head k (0-based) is one residual block on the
final-normed state, x_k = n + SiLU(n W_k + b_k) with n = final_norm(h_t), read out by the target's own
frozen LM head. The base LM head at h_t predicts position t+1 (the pending token itself); head k predicts
position t+2+k, so head 0 drafts depth 1 of the tree (the pending token's successor), head 1 depth 2, and
so on. Medusa's training shifts head k's labels by 2+k for the same reason (`medusa_loss`).

W_k and b_k start at zero, so an untrained block is the identity and every head drafts what the LM head
predicts at h_t: legal and lossless (verification is the engine's), useful for tests, rarely accepted.

Drafts fill a static tree given as a Medusa choice list of rank paths: a node at depth d with rank r
holds head d-1's r-th likeliest token, whatever its parent holds (the heads read one hidden state and do
not see the drafted tokens). Siblings come from one top-k, so they are distinct; drafts are deterministic
(verified greedily or with the point-mass rule). The tree is prunable by `--budget N|auto`.

The drafter's state is the last accepted hidden state per sequence: set in `prefill` from the last
prompt position, and in `observe` from the slot of the last accepted node (the one whose target logits
gave the next pending token). Trained heads travel as the drafter's `weights` ({"kernel": [K, E, E]
stored [in, out], "bias": [K, E]}); `save_heads` / `load_heads` keep them in a directory of their own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters import head_checkpoints as hc
from spec_jax.drafters import vocab as dv
from spec_jax.drafters.base import PrefillContext, StepContext, StepResult, TemplateDrafter
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.models import Config, final_norm, lm_head
from spec_jax.trees import TreeTemplate

HEAD_TYPE = "medusa"
heads_meta = hc.heads_meta

# Medusa's `mc_sim_7b_63` choice list (FasterDecoding/Medusa, medusa/model/medusa_choices.py): 63 nodes over 4
# levels, top-10 per head, found by simulating acceptance of Vicuna-7B's heads. Listed, as there, by expected
# acceptance, and every prefix of the list is itself a tree: `sim_16` and `sim_8` are its first nodes.
MC_SIM_7B_63 = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,), (9,),
    (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1),
    (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0),
    (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0),
)

# Tree shapes by name (`--medusa-tree`): the paper's tree, and two of its prefixes sized for devices where
# verifying many tokens is costly (a CPU). `chain` (the top-1 token of every head) is built per head count.
MEDUSA_TREES: dict[str, tuple[tuple[int, ...], ...]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    "sim_16": MC_SIM_7B_63[:16],
    "sim_8": MC_SIM_7B_63[:8],
}
TREE_NAMES = (*MEDUSA_TREES, "chain")


def tree_paths(name: str, num_heads: int) -> tuple[tuple[int, ...], ...]:
    """The rank paths of a named tree shape (`TREE_NAMES`) for `num_heads` heads."""
    return TreeTemplate.chain(num_heads).paths if name == "chain" else MEDUSA_TREES[name]


# ----------------------------------------------------------------------------- the heads (pure functions)

def init_heads(cfg: Config, num_heads: int, rng: jax.Array | None = None, *, scale: float = 0.0, mesh=None) -> dict:
    """Head parameters {"kernel": [K, E, E], "bias": [K, E]} (float32): zero, so each residual block starts as
    the identity (Medusa's initialisation); with `scale` > 0, normal(0, scale) draws from `rng` instead (tests).
    Placed replicated on `mesh` when given."""
    if num_heads < 1:
        raise InvalidArgumentError(f"Medusa needs at least one head, got {num_heads}")
    if scale and rng is None:
        raise InvalidArgumentError("init_heads: random heads (scale > 0) need an rng key")
    E = cfg.hidden_size
    if scale:
        k_kernel, k_bias = jax.random.split(rng)
        params = {"kernel": scale * jax.random.normal(k_kernel, (num_heads, E, E), jnp.float32),
                  "bias": scale * jax.random.normal(k_bias, (num_heads, E), jnp.float32)}
    else:
        params = {"kernel": np.zeros((num_heads, E, E), np.float32), "bias": np.zeros((num_heads, E), np.float32)}
    return hc.place(params, mesh)


def head_features(head_params, normed_BxE: jax.Array) -> jax.Array:
    """[B, K, E]: each head's residual block n + SiLU(n W_k + b_k) on the final-normed hidden states."""
    dt = normed_BxE.dtype
    z_BxKxE = jnp.einsum("be,kef->bkf", normed_BxE, head_params["kernel"].astype(dt))
    return normed_BxE[:, None, :] + jax.nn.silu(z_BxKxE + head_params["bias"].astype(dt)[None])


def heads_logits(head_params, target_params, cfg: Config, hidden_BxE: jax.Array,
                 vocab: dict | None = None) -> jax.Array:
    """Float32 logits [B, K, V] of every head at the target's last hidden states [B, E] (before the final norm):
    the final norm, each head's residual block, then the target's frozen LM head (one pass for all heads).
    With a reduced `vocab` (`vocab.reduced_vocab`), logits [B, K, Vd] over its tokens only."""
    normed_BxE = final_norm(target_params, cfg, hidden_BxE)
    x_BxKxE = head_features(head_params, normed_BxE)
    return lm_head(target_params, cfg, x_BxKxE) if vocab is None else dv.vocab_logits(vocab, x_BxKxE)


def medusa_loss(head_params, target_params, cfg: Config, hidden_BxTxE: jax.Array, tokens_BxT: jax.Array,
                mask_BxT: jax.Array, weights: Sequence[float] | jax.Array | None = None):
    """(weighted loss, per-head losses [K]): head k's masked mean cross-entropy against the token 2+k positions
    after each hidden state's own.

    `hidden_BxTxE[b, t]` is the target's last hidden state after reading `tokens_BxT[b, t]` (whose base LM head
    predicts t+1); head k is scored at t against `tokens_BxT[b, t+2+k]` where `mask_BxT` holds there (the
    label's mask: answer tokens, not prompt or padding), as in Medusa's training. The loss is
    sum_k weights[k] * loss_k with `weights` defaulting to 0.8**k (the paper's lambda_k: later heads are
    less certain). A head with no masked label scores 0.
    """
    B, T, E = hidden_BxTxE.shape
    K = head_params["kernel"].shape[0]
    weights_K = jnp.asarray([0.8**k for k in range(K)] if weights is None else weights, jnp.float32)
    if weights_K.shape != (K,):
        raise InvalidArgumentError(f"medusa_loss: {K} heads need {K} loss weights, got shape {weights_K.shape}")
    normed_BTxE = final_norm(target_params, cfg, hidden_BxTxE.reshape(B * T, E))
    x_BxTxKxE = head_features(head_params, normed_BTxE).reshape(B, T, K, E)
    mask_BxT = jnp.asarray(mask_BxT, jnp.float32)
    losses = []
    for k in range(K):  # one head at a time: only one [B, T, V] of logits alive at once
        shift = k + 2
        if T <= shift:
            losses.append(jnp.float32(0.0))
            continue
        logits_BxSxV = lm_head(target_params, cfg, x_BxTxKxE[:, : T - shift, k])
        labels_BxS = tokens_BxT[:, shift:]
        label_logit_BxS = jnp.take_along_axis(logits_BxSxV, labels_BxS[..., None], axis=-1)[..., 0]
        ce_BxS = jax.nn.logsumexp(logits_BxSxV, axis=-1) - label_logit_BxS
        m_BxS = mask_BxT[:, shift:]
        losses.append(jnp.sum(ce_BxS * m_BxS) / jnp.maximum(jnp.sum(m_BxS), 1.0))
    per_head_K = jnp.stack(losses)
    return jnp.sum(weights_K * per_head_K), per_head_K


# ----------------------------------------------------------------------------- the drafter

@dataclasses.dataclass(frozen=True)
class Medusa(TemplateDrafter):
    """K Medusa heads fill a static tree of rank paths (head d-1 fills depth d)."""

    num_heads: int = 4
    paths: tuple[tuple[int, ...], ...] = MC_SIM_7B_63
    name = "medusa"
    prunable = True

    def __post_init__(self):
        if self.num_heads < 1 or not self.paths:
            raise InvalidArgumentError(f"medusa needs at least one head and a non-empty tree, got {self.num_heads} "
                                       f"heads and {len(self.paths)} paths")
        depth = max(len(p) for p in self.paths)
        if depth > self.num_heads:
            raise InvalidArgumentError(f"medusa tree is {depth} levels deep but there are only {self.num_heads} "
                                       "heads (head d-1 drafts depth d)")

    @property
    def template(self) -> TreeTemplate:
        return TreeTemplate(self.paths)

    def with_template(self, template: TreeTemplate) -> Medusa:
        return dataclasses.replace(self, paths=template.paths)

    def check(self, cfg: Config, weights, carry) -> None:
        if not isinstance(weights, Mapping) or set(weights) - {"vocab"} != {"kernel", "bias"}:
            raise TypeError("the medusa drafter needs head weights {'kernel', 'bias'} (init_heads or load_heads), "
                            "and 'vocab' for a reduced draft vocabulary")
        K, E = self.num_heads, cfg.hidden_size
        shapes = tuple(np.shape(weights["kernel"])), tuple(np.shape(weights["bias"]))
        if shapes != ((K, E, E), (K, E)):
            raise InvalidArgumentError(f"medusa head weights have kernel {shapes[0]} and bias {shapes[1]}, expected "
                                       f"{(K, E, E)} and {(K, E)} for {K} heads on this model (hidden size {E})")
        top = int(self.template.ranks.max()) + 1
        if top > cfg.vocab_size:
            raise InvalidArgumentError(f"medusa tree uses the top {top} tokens per head but the vocabulary has only "
                                       f"{cfg.vocab_size}")
        dv.check_weights(weights.get("vocab"), cfg, top, self.name)

    def init(self, weights, carry, cfg: Config, batch: int, cache_size: int):
        return {"hidden_BxE": jnp.zeros((batch, cfg.hidden_size), cfg.jnp_dtype)}

    def prefill(self, weights, state, ctx: PrefillContext):
        # The last prompt position's logits gave the pending token: heads read that hidden state.
        last_Bx1x1 = (ctx.prompt_lens_B - 1)[:, None, None]
        hidden_BxE = jnp.take_along_axis(ctx.final_hidden_BxTxE, last_Bx1x1, axis=1)[:, 0]
        return {**state, "hidden_BxE": hidden_BxE.astype(state["hidden_BxE"].dtype)}

    def propose(self, weights, state, ctx: StepContext):
        tmpl = self.template
        vocab = weights.get("vocab")
        used = {k: weights[k][: tmpl.max_depth] for k in ("kernel", "bias")}  # deeper heads go unread
        logits_BxDxV = heads_logits(used, ctx.target_params, ctx.cfg, state["hidden_BxE"], vocab)
        top_BxDxR = jax.lax.top_k(logits_BxDxV, int(tmpl.ranks.max()) + 1)[1].astype(jnp.int32)
        tokens_BxN = dv.to_target_ids(vocab, top_BxDxR[:, tmpl.depth - 1, tmpl.ranks])  # head d-1's rank r
        return tmpl.build(tokens_BxN), state, ctx.cache

    def observe(self, weights, state, result: StepResult):
        # Slot of the deepest accepted node (the root when none was): its logits gave the next pending token.
        last_B = jnp.take_along_axis(result.path_BxP, result.num_accepted_B[:, None], axis=1)[:, 0]
        hidden_BxE = jnp.take_along_axis(result.final_hidden_BxTxE, last_B[:, None, None], axis=1)[:, 0]
        hidden_BxE = jnp.where(result.active_B[:, None], hidden_BxE.astype(state["hidden_BxE"].dtype),
                               state["hidden_BxE"])
        return {**state, "hidden_BxE": hidden_BxE}


# ----------------------------------------------------------------------------- checkpoints

def _shapes(config: dict) -> dict:
    K, E = config["num_heads"], config["hidden_size"]
    return {"kernel": (K, E, E), "bias": (K, E)}


def save_heads(path: str | os.PathLike, head_params, meta: Mapping, ranking_V: np.ndarray | None = None) -> Path:
    """Write Medusa heads as a heads directory (`head_checkpoints.save_heads`): float32 `kernel` [K, E, E]
    stored [in, out] and `bias` [K, E]; `meta` from `heads_meta(cfg, ...)`. Returns `path`."""
    K, E = np.shape(head_params["bias"])
    if tuple(np.shape(head_params["kernel"])) != (K, E, E) or E != meta.get("hidden_size", E):
        raise InvalidArgumentError(f"save_heads: kernel {np.shape(head_params['kernel'])} and bias {(K, E)} are not "
                                   f"{K} heads of hidden size {meta.get('hidden_size')}")
    params = {"kernel": head_params["kernel"], "bias": head_params["bias"]}
    return hc.save_heads(path, HEAD_TYPE, params, {**meta, "num_heads": int(K)}, ranking_V)


def read_heads_config(path: str | os.PathLike, cfg: Config) -> dict:
    """A heads directory's config, refused unless it is Medusa heads for this model. Reads no weights."""
    config = hc.read_heads_config(path, cfg, HEAD_TYPE, {"num_heads": int})
    if config["num_heads"] < 1:
        raise DataFormatError(f"{Path(path) / hc.CONFIG_FILE}: num_heads must be a positive integer, got "
                              f"{config['num_heads']}")
    return config


def load_heads(path: str | os.PathLike, cfg: Config, *, mesh=None) -> dict:
    """Medusa heads saved by `save_heads`, checked against model `cfg` and their own config; float32, placed
    replicated on `mesh` when given."""
    read_heads_config(path, cfg)
    return hc.load_heads(path, cfg, HEAD_TYPE, _shapes, mesh=mesh)[0]


def shipped_heads(cfg: Config) -> Path | None:
    """The Medusa heads shipped with spec-jax for a model of this shape (the embedded SmolLM2-135M), if any."""
    return hc.shipped_heads(cfg, HEAD_TYPE)


MEDUSA_OPTIONS = (
    Option("heads", str, None, "trained draft heads: a directory of config.json + heads.safetensors (save_heads); "
           "default: the heads shipped for this model (spec_jax/heads/), else untrained zero-initialised heads"),
    Option("medusa_heads", int, 4, "number of zero-initialised heads when --heads is not given (a checkpoint "
           "brings its own)", min=1),
    Option("medusa_tree", str, "mc_sim_7b_63", "static tree shape (Medusa choice list): mc_sim_7b_63 (63 nodes, "
           "4 levels), its first 16 or 8 nodes (sim_16, sim_8; 3 levels), or chain (each head's top token); prune "
           "further with --budget", choices=TREE_NAMES),
    dv.VOCAB_OPTION,
)


def check_heads_tree(opts, cfg: Config, head_type: str, read_config, untrained_heads: int, tree: str,
                     family: str) -> None:
    """`--heads` holds `head_type` heads for this model (`read_config` reads its config only, before any weights
    load; else the shipped heads, else `untrained_heads`); the `--{family}-tree` choice list is no deeper than
    there are heads (head d-1 drafts depth d); `--draft-vocab` holds the tree's widest top-k."""
    num_heads, source = untrained_heads, f"--{family}-heads {untrained_heads}"
    path = hc.heads_path(opts, cfg, head_type)
    if path is not None:
        num_heads = read_config(path, cfg)["num_heads"]
        source = f"the {num_heads} heads of " + (f"--heads {opts.heads}" if opts.heads else f"shipped {path}")
    paths = tree_paths(tree, num_heads)
    dv.check_option(opts.draft_vocab, cfg, path, min_size=int(TreeTemplate(paths).ranks.max()) + 1)
    depth = max(map(len, paths))
    if depth > num_heads:
        fits = [name for name in TREE_NAMES if max(map(len, tree_paths(name, num_heads))) <= num_heads]
        raise InvalidArgumentError(f"--{family}-tree {tree} is {depth} levels deep but there are only {num_heads} "
                                   f"heads ({source}); head d-1 drafts depth d, so choose a shallower "
                                   f"--{family}-tree ({', '.join(fits)}) or more heads")


def check_medusa(opts, cfg: Config) -> None:
    """`--heads` is Medusa heads for this model and the tree fits them (`check_heads_tree`)."""
    check_heads_tree(opts, cfg, HEAD_TYPE, read_heads_config, opts.medusa_heads, opts.medusa_tree, "medusa")


@register("medusa", "Medusa: draft heads on the target's last hidden state fill a static tree (--heads trained "
          "heads; default: those shipped for the model, else untrained zero-initialised heads)",
          options=MEDUSA_OPTIONS, check=check_medusa,
          prunable=True)
def build(opts, target) -> Built:
    path = hc.heads_path(opts, target.cfg, HEAD_TYPE)
    if path is not None:
        weights = load_heads(path, target.cfg, mesh=target.mesh)
    else:
        weights = init_heads(target.cfg, opts.medusa_heads, mesh=target.mesh)
    num_heads = int(weights["kernel"].shape[0])
    weights = dv.with_vocab(weights, opts.draft_vocab, target, path)
    return Built(Medusa(num_heads=num_heads, paths=tree_paths(opts.medusa_tree, num_heads)), weights=weights)
