"""`eagle`: EAGLE draft heads (Li et al. 2024: EAGLE-1 "Speculative Sampling Requires Rethinking Feature
Uncertainty", EAGLE-2 "Faster Inference of Language Models with Dynamic Draft Trees", EAGLE-3 "Scaling up
Inference Acceleration of Large Language Models via Training-Time Test").

EAGLE drafts at the feature level. Its draft row p pairs the target's feature f_p (what the target computed
after reading token x_p) with the input embedding of the token x_{p+1} that feature predicted:

    x = fc(concat(embed(x_{p+1}), f_p))          # [2E] -> [E]
    o_p = DecoderLayer(x)                         # one layer of the target's shape, with its own KV cache
    logits of x_{p+2} = LM head(readout(o_p))     # the target's frozen LM head (or a reduced vocabulary)

and o_p stands in for f_{p+1} when drafting deeper: the draft is autoregressive over features, carrying its
own outputs down a branch. The two variants differ in the feature space:

- EAGLE-1 (`feature_layers=()`): f is the target's final-normed last hidden state, exactly what its LM head
  reads; o is trained to regress onto f_{p+1} (smooth L1) and read out with no further norm.
- EAGLE-3 (`feature_layers=(low, mid, high)`): f fuses the residual streams after three layers,
  fuse(concat(h_low, h_mid, h_high)) ([3E] -> [E]); o is read out through a norm of the draft's own. It is
  trained with training-time test (`unroll`): the draft is fed its own outputs for several steps, as when
  drafting, and scored at every step (weights 0.8^step) by soft cross-entropy against the target's
  distribution, over a reduced draft vocabulary when one is given (`vocab.py`).

Drafting (EAGLE-2's dynamic tree, `dynamic_tree.draft_dynamic_tree`): the nodes with the highest cumulative
draft probability are expanded level by level, each expanded node a draft row fed its parent's output, and
the best `budget` kept. Verification is the engine's, on the full vocabulary: lossless. With a draft-structure
predictor (`--structure-head`, `structure.py`: AdaEAGLE), each step's tree grows only as deep as it predicts.

Draft rows and the KV cache: with c tokens committed and x_c pending, rows 0..c-1 are the committed rows
(row c-1 pairs f_{c-1} with x_c). The target's features of the newly committed tokens arrive after
verification (`observe` keeps the accepted path's), so `propose` first feeds the n rows not yet in the draft
cache (n = 1 + accepted, at most depth + 1: always fed as depth + 1 rows, the surplus in scratch), and the
last one's output is the tree's root. Rows c.. of the tree are scratch, overwritten every step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters import head_checkpoints as hc
from spec_jax.drafters import structure as st
from spec_jax.drafters import vocab as dv
from spec_jax.drafters.base import Drafter, DraftShape, PrefillContext, StepContext, StepResult
from spec_jax.drafters.dynamic_tree import DynamicTree, check_tree, draft_dynamic_tree, tree_options
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.models import Config, KVCache, embed, final_norm, forward_embeddings, init_cache, init_params, lm_head

HEAD_TYPE = "eagle"


def layer_cfg(cfg: Config) -> Config:
    """The draft's one decoder layer: the target's layer shape."""
    return cfg.replace(num_layers=1)


# ----------------------------------------------------------------------------- the draft (pure functions)

def init_eagle(cfg: Config, rng: jax.Array, feature_layers: Sequence[int] = (), *, mesh=None) -> dict:
    """Draft parameters (float32): `fc` [2E, E], `layer` (one decoder layer of the target's shape, as a model's
    `layers_0`), and for EAGLE-3 (`feature_layers` given) `fuse` [len(layers) * E, E] and `norm` [E]."""
    E = cfg.hidden_size
    k_fc, k_layer, k_fuse = jax.random.split(rng, 3)
    layer = init_params(layer_cfg(cfg).replace(dtype="float32"), k_layer)["layers_0"]
    params = {"fc": {"kernel": jax.random.normal(k_fc, (2 * E, E), jnp.float32) / math.sqrt(2 * E)}, "layer": layer}
    if feature_layers:
        n = len(feature_layers)
        params["fuse"] = {"kernel": jax.random.normal(k_fuse, (n * E, E), jnp.float32) / math.sqrt(n * E)}
        params["norm"] = {"weight": jnp.ones((E,), jnp.float32)}
    return hc.place(jax.tree.map(np.asarray, params), mesh)


def target_features(params, target_params, cfg: Config, feature_layers: Sequence[int], hidden: Mapping,
                    final_hidden: jax.Array) -> jax.Array:
    """The target's features [..., E] the draft reads: EAGLE-1's final-normed last hidden state, or EAGLE-3's
    fusion of the residual streams after `feature_layers` (`hidden[layer]`)."""
    if not feature_layers:
        return final_norm(target_params, cfg, final_hidden)
    stacked = jnp.concatenate([hidden[layer] for layer in feature_layers], axis=-1)
    return stacked @ params["fuse"]["kernel"].astype(stacked.dtype)


def draft_rows(params, target_params, cfg: Config, feats_BxTxE, tokens_BxT, positions_BxT, cache: KVCache,
               tree_mask=None) -> tuple[jax.Array, KVCache]:
    """The draft layer over rows (feature f_p, token x_{p+1}) at `positions`: outputs [B, T, E] and the draft
    cache with the rows' K/V written (at `cache.lengths`, as `forward` writes)."""
    emb = embed(target_params, cfg, tokens_BxT).astype(feats_BxTxE.dtype)
    x = jnp.concatenate([emb, feats_BxTxE], axis=-1) @ params["fc"]["kernel"].astype(feats_BxTxE.dtype)
    out = forward_embeddings({"layers_0": params["layer"]}, layer_cfg(cfg), x, positions_BxT, cache, tree_mask,
                             compute_logits=False)
    return out.final_hidden, out.cache


def readout(params, target_params, cfg: Config, out_BxTxE, vocab: dict | None = None) -> jax.Array:
    """Float32 draft logits of draft outputs: EAGLE-3's own norm first (EAGLE-1's outputs are already in the
    final-normed space), then the target's LM head, or the reduced vocabulary's rows of it."""
    h = final_norm({"norm": params["norm"]}, cfg, out_BxTxE) if "norm" in params else out_BxTxE
    return lm_head(target_params, cfg, h) if vocab is None else dv.vocab_logits(vocab, h)


def unroll(params, target_params, cfg: Config, feats_BxLxE, tokens_BxL, steps: int) -> list[jax.Array]:
    """Training-time test: the draft over whole rows for `steps` steps, step j fed its own step j-1 outputs.

    Row p of step 0 reads (f_p, x_{p+1}) and attends to rows <= p: the root row after committed row p. Row r
    of step j >= 1 reads (o^{j-1}_{r-1}, x_{r+1}): the node at depth j of a chain drafted after committed row
    r - j (its output drafts depth j + 1), and attends to what that node attends to when drafting: the
    committed rows <= r - j of step 0 and its chain ancestors, row r - j + i of step i. Every step scores
    x_{r+2} at row r (`tokens_BxL[:, r + 1]` is fed, so the caller shifts by one). Returns [o^0, ..., o^J-1].
    """
    B, L, _ = feats_BxLxE.shape
    lcfg = layer_cfg(cfg).replace(dtype="float32")
    cache = init_cache(lcfg, B, steps * L, jnp.float32)
    positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    rows_L, outs, feats = jnp.arange(L), [], feats_BxLxE
    for j in range(steps):
        mask = None
        if j:  # keys of step i at rows q: step 0 q <= r - j; step i >= 1 q == r - j + i
            cols = [rows_L[None, :] <= rows_L[:, None] - j]
            cols += [rows_L[None, :] == rows_L[:, None] - j + i for i in range(1, j + 1)]
            mask = jnp.broadcast_to(jnp.concatenate(cols, axis=1), (B, L, (j + 1) * L))
        out, cache = draft_rows(params, target_params, cfg, feats, tokens_BxL, positions_BxL, cache, mask)
        outs.append(out)
        feats = jnp.pad(out[:, :-1], ((0, 0), (1, 0), (0, 0)))  # row r reads the output of row r - 1
    return outs


def eagle_loss(params, target_params, cfg: Config, batch: Mapping, rng, *, feature_layers: Sequence[int] = (),
               steps: int = 1, regression: float = 1.0, soft_ce: float = 0.1, noise: float = 0.2,
               vocab: dict | None = None):
    """(loss, aux) of the draft on a batch of whole rows.

    `batch`: `tokens` [B, L], `mask` [B, L] (answer tokens), `hidden_<i>` [B, L, E] (residual stream after i
    layers: the last layer's for EAGLE-1, `feature_layers`' for EAGLE-3), `starts` [B, S] (rows r where the
    next-next token x_{r+2} is scored: the LM head is costly, so only there).
    The loss is sum_j 0.8^j * (soft_ce * CE_j + [j == 0] * regression * L1): CE_j the soft cross-entropy of
    step j's draft distribution at rows r against the target's at r + 1 (which predicted x_{r+2}); L1 the
    smooth-L1 regression of step 0's outputs onto the next row's features (EAGLE-1: every answer row). The
    input features get uniform noise of width `noise` (EAGLE's U(-0.1, 0.1) for 0.2). With a `vocab`, both
    distributions live on its tokens (the target's renormalised there) and rows whose target token lies
    outside it are not scored, as in EAGLE-3.
    """
    tokens_BxL, mask_BxL = batch["tokens"], batch["mask"].astype(jnp.float32)
    B, L = tokens_BxL.shape
    last = batch[f"hidden_{cfg.num_layers}"]
    feats = target_features(params, target_params, cfg, feature_layers,
                            {i: batch[f"hidden_{i}"] for i in feature_layers}, last)
    noisy = feats + noise * (jax.random.uniform(rng, feats.shape) - 0.5)
    next_tokens_BxL = jnp.pad(tokens_BxL[:, 1:], ((0, 0), (0, 1)))  # row p reads x_{p+1}
    outs = unroll(params, target_params, cfg, noisy, next_tokens_BxL, steps)

    starts_BxS = batch["starts"]
    take = lambda a, idx: jnp.take_along_axis(a, idx[..., None], axis=1)  # noqa: E731
    # The target's distribution of x_{r+2}: its logits after reading x_{r+1}.
    target_h = final_norm(target_params, cfg, take(last, jnp.minimum(starts_BxS + 1, L - 1)))
    t_logits = jax.lax.stop_gradient(lm_head(target_params, cfg, target_h))
    label_m_BxS = jnp.take_along_axis(jnp.pad(mask_BxL[:, 2:], ((0, 0), (0, 2))), starts_BxS, axis=1)
    if vocab is not None:  # rows whose target token is outside the draft vocabulary teach nothing (EAGLE-3)
        in_vocab_V = jnp.zeros((cfg.vocab_size,), bool).at[vocab["d2t"]].set(True)
        label_m_BxS = label_m_BxS * in_vocab_V[jnp.argmax(t_logits, axis=-1)]
        t_logits = jnp.take(t_logits, vocab["d2t"], axis=-1)
    t_logp = jax.nn.log_softmax(t_logits, axis=-1)
    t_top_BxS = jnp.argmax(t_logp, axis=-1)
    total, ce_steps, acc_steps = 0.0, [], []
    for j, out in enumerate(outs):
        logp = jax.nn.log_softmax(readout(params, target_params, cfg, take(out, starts_BxS), vocab), axis=-1)
        m = label_m_BxS * (starts_BxS >= j)  # step j needs a chain of j draft rows before r
        ce_BxS = -jnp.sum(jnp.exp(t_logp) * logp, axis=-1)
        ce = jnp.sum(ce_BxS * m) / jnp.maximum(jnp.sum(m), 1.0)
        acc = jnp.sum((jnp.argmax(logp, -1) == t_top_BxS) * m) / jnp.maximum(jnp.sum(m), 1.0)
        total = total + 0.8**j * soft_ce * ce
        ce_steps.append(ce)
        acc_steps.append(acc)
    aux = {"ce": jnp.stack(ce_steps), "top1": jnp.stack(acc_steps), "tokens": jnp.sum(label_m_BxS)}
    if regression:
        m_BxL = jnp.pad(mask_BxL[:, 1:], ((0, 0), (0, 1)))  # row p regresses onto f_{p+1}, an answer row
        diff = jnp.abs(outs[0][:, :-1] - jax.lax.stop_gradient(feats[:, 1:]))
        l1_BxL = jnp.mean(jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5), axis=-1)
        l1 = jnp.sum(l1_BxL * m_BxL[:, :-1]) / jnp.maximum(jnp.sum(m_BxL[:, :-1]), 1.0)
        total = total + regression * l1
        aux["l1"] = l1
    return total, aux


def chain_acceptance(params, target_params, cfg: Config, batch: Mapping, *, feature_layers: Sequence[int] = (),
                     steps: int = 5, vocab: dict | None = None) -> dict:
    """Simulated acceptance on held-out rows: a greedy chain of `steps` drafts after each start row r (fed
    their own outputs, as `unroll` does) against the target's greedy tokens x_{r+2..}; sim_tau is 1 + the
    mean run of hits, step_top1 each step's hit rate given all earlier hits."""
    tokens_BxL, mask_BxL = np.asarray(batch["tokens"]), np.asarray(batch["mask"], bool)
    B, L = tokens_BxL.shape
    feats = target_features(params, target_params, cfg, feature_layers,
                            {i: jnp.asarray(batch[f"hidden_{i}"]) for i in feature_layers},
                            jnp.asarray(batch[f"hidden_{cfg.num_layers}"]))
    outs = unroll(params, target_params, cfg, feats, jnp.pad(jnp.asarray(tokens_BxL[:, 1:]), ((0, 0), (0, 1))), steps)
    starts = np.asarray(batch["starts"])
    hits, valid = [], []
    for j, out in enumerate(outs):
        rows = np.minimum(starts + j, L - 1)
        logits = readout(params, target_params, cfg, jnp.take_along_axis(out, jnp.asarray(rows)[..., None], axis=1),
                         vocab)
        top = np.asarray(dv.to_target_ids(vocab, jnp.argmax(logits, axis=-1)))
        label_idx = np.minimum(rows + 2, L - 1)
        ok = np.take_along_axis(mask_BxL, label_idx, 1) & (rows + 2 < L)
        hits.append((top == np.take_along_axis(tokens_BxL, label_idx, 1)) & ok)
        valid.append(ok)
    hit_BxSxJ, valid_BxSxJ = np.stack(hits, -1), np.stack(valid, -1)
    run = np.cumprod(hit_BxSxJ, axis=-1)
    reached = np.concatenate([valid_BxSxJ[..., :1], run[..., :-1] & valid_BxSxJ[..., 1:]], axis=-1)
    return {"sim_tau": float(1 + run.sum(-1)[valid_BxSxJ[..., 0]].mean()),
            "step_top1": [round(float(run[..., j].sum() / max(reached[..., j].sum(), 1)), 4) for j in range(steps)]}


# ----------------------------------------------------------------------------- the drafter

@dataclasses.dataclass(frozen=True)
class Eagle(Drafter):
    """An EAGLE draft layer grows an EAGLE-2 dynamic tree (see the module doc)."""

    feature_layers: tuple[int, ...] = ()
    tree: DynamicTree = DynamicTree(depth=5, width=4, k=4, budget=16)
    structure: st.Structure | None = None  # a draft-structure predictor sets each step's depth (weights["structure"])
    name = "eagle"
    prunable = True

    @property
    def shape(self) -> DraftShape:
        return DraftShape(nodes=self.tree.num_nodes, depth=min(self.tree.depth, self.tree.num_nodes))

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return self.feature_layers

    def pruned(self, nodes: int, rates=None) -> Eagle:
        """This drafter keeping `nodes` nodes of its tree (`--budget`): its best-scored ones."""
        if self.tree.sampled:
            raise InvalidArgumentError("--budget needs deterministic children (sampled children keep the whole "
                                       "expansion)")
        return dataclasses.replace(self, tree=dataclasses.replace(self.tree, budget=nodes))

    def check(self, cfg: Config, weights, carry) -> None:
        expect = _shapes({"feature_layers": list(self.feature_layers), "hidden_size": cfg.hidden_size}, cfg)
        if not isinstance(weights, Mapping):
            raise TypeError("the eagle drafter needs draft weights (init_eagle or load_eagle)")
        got = _flat_shapes({k: v for k, v in weights.items() if k not in ("vocab", st.HEAD_TYPE)})  # shapes only
        if got != expect:
            raise InvalidArgumentError(f"eagle weights do not fit this model and feature layers "
                                       f"{self.feature_layers}: {sorted(set(got.items()) ^ set(expect.items()))[:4]}")
        if any(not 0 < i <= cfg.num_layers for i in self.feature_layers):
            raise InvalidArgumentError(f"eagle feature layers {self.feature_layers} must be in 1..{cfg.num_layers}")
        dv.check_weights(weights.get("vocab"), cfg, self.tree.k, self.name)
        st.check_weights(self.structure, weights.get(st.HEAD_TYPE), st.input_size(cfg.hidden_size, cfg.hidden_size),
                         self.name)
        if weights.get("vocab") is not None and self.tree.sampled:
            raise InvalidArgumentError("eagle: sampled children need the full draft vocabulary (the verifier needs "
                                       "q on the target's); use top-k children or omit --draft-vocab")

    def init(self, weights, carry, cfg: Config, batch: int, cache_size: int):
        P = self.shape.depth + 1
        raw = {key: jnp.zeros((batch, P, cfg.hidden_size), cfg.jnp_dtype) for key in self._raw_keys()}
        return {"cache": init_cache(layer_cfg(cfg), batch, cache_size + P + self.tree.num_fed), "raw": raw,
                "n_B": jnp.ones((batch,), jnp.int32)}

    def _raw_keys(self) -> tuple[str, ...]:
        """The target states the features are made of: the layers fused (EAGLE-3) or the last one's output."""
        return tuple(f"h{i}" for i in self.feature_layers) or ("final",)

    def _raw(self, hidden: Mapping, final_hidden):
        return {f"h{i}": hidden[i] for i in self.feature_layers} if self.feature_layers else {"final": final_hidden}

    def _features(self, weights, target_params, cfg, raw):
        hidden = {i: raw[f"h{i}"] for i in self.feature_layers}
        return target_features(weights, target_params, cfg, self.feature_layers, hidden, raw.get("final"))

    def prefill(self, weights, state, ctx: PrefillContext):
        B, T = ctx.prompts_BxT.shape
        raw = self._raw(ctx.hidden, ctx.final_hidden_BxTxE)
        feats_BxTxE = self._features(weights, ctx.target_params, ctx.cfg, raw).astype(ctx.cfg.jnp_dtype)
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        # Rows 0..len-2 are committed; row len-1 (whose token is the pending one) is fed again by `propose`,
        # and rows past it are padding, in scratch.
        cache = state["cache"].replace(lengths=jnp.zeros_like(ctx.prompt_lens_B))
        _, cache = draft_rows(weights, ctx.target_params, ctx.cfg, feats_BxTxE, ctx.tokens_BxS[:, 1:T + 1],
                              positions_BxT, cache)
        last_Bx1x1 = (ctx.prompt_lens_B - 1)[:, None, None]
        raw_last = {k: jnp.take_along_axis(v, last_Bx1x1, axis=1) for k, v in raw.items()}
        raw = {k: state["raw"][k].at[:, :1].set(raw_last[k].astype(state["raw"][k].dtype)) for k in raw}
        return {**state, "cache": cache, "raw": raw, "n_B": jnp.ones_like(ctx.prompt_lens_B)}

    def propose(self, weights, state, ctx: StepContext):
        cfg, vocab = ctx.cfg, weights.get("vocab")
        params = {k: v for k, v in weights.items() if k not in ("vocab", st.HEAD_TYPE)}
        feats_BxPxE = self._features(params, ctx.target_params, cfg, state["raw"]).astype(cfg.jnp_dtype)
        P = feats_BxPxE.shape[1]
        base_B = ctx.committed_B - state["n_B"]  # the first row not yet in the draft cache
        rows_BxP = base_B[:, None] + jnp.arange(P, dtype=jnp.int32)[None]
        S = ctx.tokens_BxS.shape[1]
        tokens_BxP = jnp.take_along_axis(ctx.tokens_BxS, jnp.minimum(rows_BxP + 1, S - 1), axis=1)
        out_BxPxE, cache = draft_rows(params, ctx.target_params, cfg, feats_BxPxE, tokens_BxP, rows_BxP,
                                      state["cache"].replace(lengths=base_B))
        root_BxE = jnp.take_along_axis(out_BxPxE, (state["n_B"] - 1)[:, None, None], axis=1)[:, 0]
        root_logits_BxV = readout(params, ctx.target_params, cfg, root_BxE, vocab)
        committed_B = ctx.committed_B
        limit_B = None
        if self.structure is not None:  # AdaEAGLE's LDLP reads (e(x_c), f_{c-1}) at the root: how deep to draft
            feat_BxE = jnp.take_along_axis(feats_BxPxE, (state["n_B"] - 1)[:, None, None], axis=1)[:, 0]
            x_BxI = st.structure_inputs(embed(ctx.target_params, cfg, ctx.pending_B), feat_BxE, root_logits_BxV)
            limit_B = st.depth_limit(st.predict_accepted(weights[st.HEAD_TYPE], x_BxI), self.structure.margin,
                                     self.tree.depth)

        def tree_step(carry, tokens_BxW, positions_BxW, tree_mask, parent_slot_BxW):
            cache, fed_out_BxFxE = carry
            known_BxFxE = jnp.concatenate([root_BxE[:, None], fed_out_BxFxE], axis=1)  # index 0: the root
            parent_BxWxE = jnp.take_along_axis(known_BxFxE, (parent_slot_BxW + 1)[:, :, None], axis=1)
            out, cache = draft_rows(params, ctx.target_params, cfg, parent_BxWxE, dv.to_target_ids(vocab, tokens_BxW),
                                    positions_BxW, cache.replace(lengths=committed_B), tree_mask)
            logits = readout(params, ctx.target_params, cfg, out, vocab)
            return logits, (cache, jnp.concatenate([fed_out_BxFxE, out], axis=1))

        empty = jnp.zeros((root_BxE.shape[0], 0, root_BxE.shape[1]), root_BxE.dtype)
        # Row c-1 is the root's row, so a depth-d node is row c-1+d (its position).
        tree, _, (cache, _) = draft_dynamic_tree(tree_step, (cache, empty), root_logits_BxV, committed_B - 1,
                                                 self.tree, ctx.sampling, ctx.rng, limit_B)
        tree = tree.replace(tokens=dv.to_target_ids(vocab, tree.tokens))
        return tree, {**state, "cache": cache}, ctx.cache

    def observe(self, weights, state, result: StepResult):
        # The target's states at the root slot and the accepted nodes: the rows the next step feeds first.
        take = lambda a: jnp.take_along_axis(a, result.path_BxP[:, :, None], axis=1)  # noqa: E731
        raw = {k: take(v) for k, v in self._raw(result.hidden, result.final_hidden_BxTxE).items()}
        active_B = result.active_B
        raw = {k: jnp.where(active_B[:, None, None], v.astype(state["raw"][k].dtype), state["raw"][k])
               for k, v in raw.items()}
        n_B = jnp.where(active_B, result.num_accepted_B + 1, state["n_B"])
        return {**state, "raw": raw, "n_B": n_B}


# ----------------------------------------------------------------------------- checkpoints

def _shapes(config: Mapping, cfg: Config) -> dict:
    """Flat parameter names -> shapes of an EAGLE draft for model `cfg` with the config's feature layers."""
    E, layers = cfg.hidden_size, config["feature_layers"]
    abstract = jax.eval_shape(lambda: init_params(layer_cfg(cfg), jax.random.key(0))["layers_0"])
    shapes = {f"layer.{k}": s for k, s in _flat_shapes(abstract).items()}
    shapes["fc.kernel"] = (2 * E, E)
    if layers:
        shapes["fuse.kernel"] = (len(layers) * E, E)
        shapes["norm.weight"] = (E,)
    return shapes


def _flat_shapes(tree) -> dict:
    return {k: tuple(np.shape(v)) for k, v in hc.flat_names(tree).items()}


def save_eagle(path: str | os.PathLike, params, meta: Mapping, feature_layers: Sequence[int] = (),
               ranking_V: np.ndarray | None = None) -> Path:
    """Write an EAGLE draft as a heads directory (`head_checkpoints`); `meta` from `heads_meta(cfg, ...)`. The
    weights are stored float16: a draft layer of the target's shape is most of 20 MB in float32 for SmolLM2."""
    params = {k: v for k, v in params.items() if k != "vocab"}
    return hc.save_heads(path, HEAD_TYPE, params, {**meta, "feature_layers": list(feature_layers)}, ranking_V,
                         dtype=np.float16)


def read_eagle_config(path: str | os.PathLike, cfg: Config) -> dict:
    """An EAGLE heads directory's config for this model (feature layers within its layers). Reads no weights."""
    config = hc.read_heads_config(path, cfg, HEAD_TYPE, {"feature_layers": list})
    layers = config["feature_layers"]
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 < i <= cfg.num_layers for i in layers):
        raise DataFormatError(f"{Path(path) / hc.CONFIG_FILE}: feature_layers must be layer counts in "
                              f"1..{cfg.num_layers}, got {layers}")
    return config


def load_eagle(path: str | os.PathLike, cfg: Config, *, mesh=None) -> tuple[dict, tuple[int, ...]]:
    """(params, feature layers) of an EAGLE draft saved by `save_eagle`, checked against model `cfg`."""
    read_eagle_config(path, cfg)
    params, config = hc.load_heads(path, cfg, HEAD_TYPE, lambda c: _shapes(c, cfg), mesh=mesh)
    return params, tuple(config["feature_layers"])


# ----------------------------------------------------------------------------- registry

EAGLE3_LAYERS = "eagle3"  # --feature-layers eagle3: EAGLE-3's low, middle and high layers of the model


def parse_layers(text: str, cfg: Config) -> tuple[int, ...]:
    """`--feature-layers`: `last` (EAGLE-1), `eagle3` (layers 2, L/2 and L-2 of L), or a comma list."""
    if text == "last":
        return ()
    if text == EAGLE3_LAYERS:
        L = cfg.num_layers
        return tuple(sorted({min(2, L), max(L // 2, 1), max(L - 2, 1)}))
    try:
        layers = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise InvalidArgumentError(f"--feature-layers {text}: give last, eagle3 or layer counts like 2,15,28") from None
    if any(not 0 < i <= cfg.num_layers for i in layers):
        raise InvalidArgumentError(f"--feature-layers {text}: layers must be in 1..{cfg.num_layers}")
    return layers


EAGLE_OPTIONS = (
    Option("heads", str, None, "a trained EAGLE draft: a directory of config.json + heads.safetensors (save_eagle); "
           "default: the one shipped for this model (spec_jax/heads/), else an untrained random draft"),
    Option("feature_layers", str, "last", "features of an untrained draft (a checkpoint brings its own): last "
           "(EAGLE-1: the final-normed last hidden state), eagle3 (fused low/middle/high layers) or a list 2,15,28"),
    *tree_options(depth=5, width=4, k=4, budget=16),
    dv.VOCAB_OPTION,
    *st.STRUCTURE_OPTIONS,
)


def check_eagle(opts, cfg: Config) -> None:
    """--heads is an EAGLE draft for this model (config only); tree options and --draft-vocab agree."""
    check_tree(opts)
    path = hc.heads_path(opts, cfg, HEAD_TYPE)
    if path is not None:
        read_eagle_config(path, cfg)
    else:
        parse_layers(opts.feature_layers, cfg)
    dv.check_option(opts.draft_vocab, cfg, path, min_size=opts.tree_k)
    if opts.draft_vocab and opts.sampled_children:
        raise InvalidArgumentError("--sampled-children needs the full draft vocabulary (the verifier needs the draft "
                                   "distribution on the target's tokens); omit --draft-vocab")
    st.check_option(opts, cfg, "eagle")


@register("eagle", "EAGLE: a one-layer draft over the target's features grows an EAGLE-2 dynamic tree (--heads a "
          "trained draft; default: the one shipped for the model; EAGLE-1 or EAGLE-3 features)",
          options=EAGLE_OPTIONS, check=check_eagle, prunable=True)
def build(opts, target) -> Built:
    path = hc.heads_path(opts, target.cfg, HEAD_TYPE)
    if path is not None:
        weights, layers = load_eagle(path, target.cfg, mesh=target.mesh)
    else:
        layers = parse_layers(opts.feature_layers, target.cfg)
        weights = init_eagle(target.cfg, jax.random.key(0), layers, mesh=target.mesh)
    weights = dv.with_vocab(weights, opts.draft_vocab, target, path)
    structure, weights = st.with_structure(opts, target, "eagle", weights)
    tree = DynamicTree(depth=opts.tree_depth, width=opts.tree_width, k=opts.tree_k, budget=opts.tree_budget,
                       sampled=opts.sampled_children)
    return Built(Eagle(feature_layers=layers, tree=tree, structure=structure), weights=weights)
