"""Recipe family `specdecpp`: SpecDec++'s acceptance-prediction head (`spec_jax.drafters.specdecpp`) for one
draft model, trained on the self-distillation data.

The data follows the reference implementation (Kaffaljidhmah2/SpecDec_pp, data/gen_*.py and train.py):

- X: the target's answer tokens of each row (the data store's tokens, answer positions by `loss_mask`);
- Y_t: what the draft drafts at answer position t given X_<t, teacher-forced: sampled from its distribution
  q_t at temperature 1 (`gen_assistant.py --do_sample`), or its argmax with `acc_greedy`;
- the soft label of Y_t: min(1, p_t(Y_t) / q_t(Y_t)) (`gen_acceptance.py`), p_t the target's distribution
  (its last hidden state in the store through the final norm and LM head); with `acc_greedy` the label is the
  temperature-0 limit of the same ratio, [Y_t == argmax p_t], the acceptance of greedy verification;
- the head's input: the draft's final-normed hidden state at position t over prompt + Z, where Z_t is Y_t,
  or X_t with probability `acc_mixing` (0.15, `--mixing_ratio`), whose label is then ignored (`train.py`).

All of it is computed once (two draft forwards and one target LM head over every row) and kept, features at
the labelled positions only, in `<train.output_dir>/acceptance_data.npz` for a resumed run; training then
steps over labelled positions with the class-weighted BCE (`specdecpp.weighted_bce`, mismatch weight 6).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters import specdecpp as sd
from spec_jax.errors import InvalidArgumentError
from spec_jax.models import Config, final_norm, forward, head, init_cache
from spec_jax.policies import FixedLength
from spec_jax.training.recipes import Parts, Recipe, _need_layers, held_out_prompts

CHUNK_ROWS = 4  # rows per teacher-forced forward (two [rows, L, V] float32 logit arrays live at once)


def draft_options(recipe: Recipe) -> SimpleNamespace:
    """The `draft_model.load_draft` options of the draft a recipe trains its head for."""
    return SimpleNamespace(draft_model=recipe.acc_draft_model or None, draft_layers=recipe.acc_draft_layers or None,
                           draft_vocab=0)


@functools.partial(jax.jit, static_argnames=("dcfg", "cfg", "greedy"))
def draft_labels(draft, dcfg: Config, target_params, cfg: Config, tokens_RxL, hidden_RxLxE, keys_R, greedy: bool):
    """(Y [R, L], soft acceptance labels [R, L]) at every position t >= 1: the draft's token after X_<t and
    min(1, p(Y)/q(Y)) (or [Y == argmax p] when `greedy`); position 0 holds zeros."""
    R, L = tokens_RxL.shape
    positions_RxL = jnp.broadcast_to(jnp.arange(L), (R, L))
    q_logits = forward(draft, dcfg, tokens_RxL, positions_RxL, init_cache(dcfg, R, L)).logits[:, :-1]
    p_logits = head(target_params, cfg, hidden_RxLxE[:, :-1].astype(jnp.float32)).astype(jnp.float32)
    if greedy:
        y = jnp.argmax(q_logits, axis=-1)
        acc = (jnp.argmax(p_logits, axis=-1) == y).astype(jnp.float32)
    else:
        y = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(keys_R, q_logits)
        take = lambda lp: jnp.take_along_axis(lp, y[..., None], axis=-1)[..., 0]  # noqa: E731
        log_ratio = take(jax.nn.log_softmax(p_logits, -1)) - take(jax.nn.log_softmax(q_logits, -1))
        acc = jnp.exp(jnp.minimum(log_ratio, 0.0))  # min(1, p/q), SpecDec++'s (and Leviathan's) acceptance
    pad = lambda a: jnp.pad(a, ((0, 0), (1, 0)))  # noqa: E731
    return pad(y.astype(jnp.int32)), pad(acc)


@functools.partial(jax.jit, static_argnames="dcfg")
def draft_features(draft, dcfg: Config, tokens_RxL) -> jax.Array:
    """The draft's final-normed last hidden states [R, L, E] over whole rows (what the head reads)."""
    R, L = tokens_RxL.shape
    out = forward(draft, dcfg, tokens_RxL, jnp.broadcast_to(jnp.arange(L), (R, L)), init_cache(dcfg, R, L),
                  compute_logits=False)
    return final_norm(draft, dcfg, out.final_hidden)


def build_examples(recipe: Recipe, data, rows_R: np.ndarray, draft, dcfg: Config, target) -> dict[str, np.ndarray]:
    """The head's training examples from `rows_R`: `feats` [N, E] float16, `label` [N] (acceptance
    probability), `row` [N] (see the module doc)."""
    cfg, seed = target.cfg, recipe.train.seed
    draft = {k: v for k, v in draft.items() if k != "vocab"}
    out = {"feats": [], "label": [], "row": []}
    for start in range(0, len(rows_R), CHUNK_ROWS):
        rows = rows_R[start: start + CHUNK_ROWS]
        padded = np.concatenate([rows, np.repeat(rows[-1:], CHUNK_ROWS - len(rows))])  # one shape for every chunk
        a = data.read(padded, ["tokens", "loss_mask", f"hidden_{cfg.num_layers}"])
        x_RxL, answer_RxL = a["tokens"].astype(np.int32), a["loss_mask"].astype(bool)
        answer_RxL[:, 0] = False
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(jnp.asarray(padded, jnp.int32))
        y, acc = draft_labels(draft, dcfg, target.params, cfg, jnp.asarray(x_RxL),
                              jnp.asarray(a[f"hidden_{cfg.num_layers}"]), keys, recipe.acc_greedy)
        mix_RxL = np.stack([np.random.default_rng([seed, int(r), 1]).random(x_RxL.shape[1]) < recipe.acc_mixing
                            for r in padded])
        z_RxL = np.where(answer_RxL & ~mix_RxL, np.asarray(y), x_RxL)  # the paper's mixture of Y and X
        feats = np.asarray(draft_features(draft, dcfg, jnp.asarray(z_RxL)))
        keep = answer_RxL & ~mix_RxL
        keep[len(rows):] = False  # the padding rows
        out["feats"].append(feats[keep].astype(np.float16))
        out["label"].append(np.asarray(acc)[keep].astype(np.float32))
        out["row"].append(np.broadcast_to(padded[:, None], keep.shape)[keep].astype(np.int32))
    return {k: np.concatenate(v) for k, v in out.items()}


def cached_examples(recipe: Recipe, data, draft, dcfg: Config, target, identity: dict) -> dict[str, np.ndarray]:
    """`build_examples` over every row, read from `<train.output_dir>/acceptance_data.npz` when that file was
    made from the same data, draft and settings (a resumed run does not recompute them)."""
    settings = {"manifest": hashlib.sha256((Path(recipe.data) / "manifest.json").read_bytes()).hexdigest(),
                "draft": identity, "seed": recipe.train.seed, "mixing": recipe.acc_mixing, "greedy": recipe.acc_greedy}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    path = Path(recipe.train.output_dir) / "acceptance_data.npz"
    if path.is_file():
        with np.load(path) as f:
            if str(f["key"]) == key:
                return {k: f[k] for k in ("feats", "label", "row")}
    examples = build_examples(recipe, data, np.arange(len(data)), draft, dcfg, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, key=np.array(key), **examples)
    os.replace(tmp, path)
    return examples


def head_metrics(head, feats_NxE, label_N, reject_weight: float) -> dict:
    """How well the head predicts acceptance on examples: the weighted BCE it is trained on, the plain BCE, the
    reference's binary KL to the labels, the AUC of its rejection probability for the rejected tokens (label <
    0.5), and the mean predicted and true acceptance (calibration)."""
    logits = sd.head_logits(head, jnp.asarray(feats_NxE))
    y = jnp.asarray(label_N)
    ones = jnp.ones_like(y, bool)
    bce = float(sd.weighted_bce(logits, y, ones, 1.0))
    p_acc = np.asarray(jax.nn.softmax(logits, -1)[:, sd.ACCEPT])
    ent = -np.where(label_N > 0, label_N * np.log(np.maximum(label_N, 1e-12)), 0) - \
        np.where(label_N < 1, (1 - label_N) * np.log(np.maximum(1 - label_N, 1e-12)), 0)
    return {"weighted_bce": round(float(sd.weighted_bce(logits, y, ones, reject_weight)), 5),
            "bce": round(bce, 5), "kl": round(bce - float(ent.mean()), 5),
            "auc_reject": round(auc(1 - p_acc, label_N < 0.5), 4),
            "mean_pred_accept": round(float(p_acc.mean()), 4), "mean_label_accept": round(float(label_N.mean()), 4),
            "examples": int(len(label_N))}


def auc(score_N: np.ndarray, positive_N: np.ndarray) -> float:
    """Area under the ROC curve: the probability a positive scores above a negative (ties count half)."""
    pos, neg = score_N[positive_N], score_N[~positive_N]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.sort(neg)
    below = np.searchsorted(order, pos, side="left")
    ties = np.searchsorted(order, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def engine_draft_length(drafter, weights, target, prompts: list[list[int]], max_new: int) -> dict:
    """The drafter decoding `prompts` through the engine (greedy), one step at a time from the host: the mean
    number of tokens it drafted per step and sequence (K) over `k_steps` such steps."""
    from spec_jax.decoding import Engine

    engine = Engine(target.cfg, drafter)
    padded, lens = engine.pad_prompts(prompts)
    state = engine.prefill(target.params, weights, None, padded, lens, max_new, 0,
                           engine.cache_size(int(lens.max()), max_new))
    drafted = steps = 0
    while not engine.all_done(state):
        active_B = ~np.asarray(state.done_B)
        proposal = engine.draft_phase(target.params, weights, state)
        drafted += int(np.asarray(proposal.tree.valid).sum(axis=1)[active_B].sum())
        steps += int(active_B.sum())
        state = engine.verify_phase(target.params, weights, state, proposal)
    return {"mean_k": round(drafted / max(steps, 1), 3), "k_steps": steps}


def specdecpp_parts(recipe: Recipe, data, n_train: int, target, vocab) -> Parts:
    """SpecDec++'s acceptance head for the recipe's draft: examples built once (module doc), class-weighted BCE
    over labelled positions, held-out head metrics and, at the end, the real mean K through the engine."""
    from spec_jax.drafters.draft_model import check_draft, load_draft

    cfg = target.cfg
    if recipe.draft_vocab:
        raise InvalidArgumentError("recipe specdecpp: draft_vocab must be 0 (the head learns the full-vocabulary "
                                   "draft's acceptance)")
    if recipe.acc_min_k > recipe.acc_max_k:
        raise InvalidArgumentError(f"recipe specdecpp: acc_min_k {recipe.acc_min_k} > acc_max_k {recipe.acc_max_k}")
    if not 0 < recipe.acc_threshold < 1:
        raise InvalidArgumentError(f"recipe specdecpp: acc_threshold {recipe.acc_threshold} must be strictly between "
                                   "0 and 1 (the stop rule's probability that some draft is rejected)")
    _need_layers(data, [cfg.num_layers], recipe, "the target's last layer, for its distribution")
    opts = draft_options(recipe)
    check_draft(opts, cfg)
    draft, dcfg = load_draft(opts, target)
    identity = sd.draft_identity(draft, dcfg)
    ex = cached_examples(recipe, data, draft, dcfg, target, identity)
    train_idx, held_idx = np.nonzero(ex["row"] < n_train)[0], np.nonzero(ex["row"] >= n_train)[0]
    if not len(train_idx) or not len(held_idx):
        raise InvalidArgumentError(f"{recipe.data}: no labelled answer positions in the training or held-out rows")

    def batches(step, *, seed, batch_size):  # labelled positions, one permutation per epoch
        i = step * batch_size + np.arange(batch_size)
        epoch, pos = np.divmod(i, len(train_idx))
        idx = np.empty(batch_size, np.int64)
        for e in np.unique(epoch):
            order = np.random.default_rng([seed, int(e)]).permutation(len(train_idx))
            idx[epoch == e] = train_idx[order[pos[epoch == e]]]
        return {"feats": ex["feats"][idx], "label": ex["label"][idx]}

    def loss_fn(params, frozen, batch, rng):
        logits = sd.head_logits(params, batch["feats"])
        loss = sd.weighted_bce(logits, batch["label"], jnp.ones_like(batch["label"], bool), recipe.acc_reject_weight)
        return loss, {"tokens": batch["label"].shape[0]}

    def drafter(params, vocab):
        d = sd.SpecDecPP(draft_cfg=dcfg, policy=FixedLength(recipe.acc_max_k), threshold=recipe.acc_threshold,
                         min_k=recipe.acc_min_k)
        return d, {"draft": draft, "head": jax.tree.map(jnp.asarray, params)}

    final: dict = {}

    def evaluate(params, frozen, step):
        metrics = head_metrics(params, ex["feats"][held_idx], ex["label"][held_idx], recipe.acc_reject_weight)
        if step >= recipe.train.total_steps and recipe.tau_prompts:  # the real K once, at the end
            if step not in final:
                prompts = held_out_prompts(data, n_train, recipe.tau_prompts)
                final[step] = engine_draft_length(*drafter(params, None), target, prompts, recipe.tau_tokens)
            metrics |= final[step]
        return metrics

    def save(path, params, meta, ranking):
        return sd.save_acceptance_head(path, params, meta, {**identity, "source": _describe(opts, cfg)})

    params = sd.init_head(dcfg.hidden_size, recipe.acc_blocks, jax.random.key(recipe.train.seed))
    return Parts(params=params, frozen=(), loss_fn=loss_fn, batches=batches, evaluate=evaluate, drafter=drafter,
                 save=save)


def _describe(opts, cfg: Config) -> str:
    """Which draft the options name, in words (for the head's config)."""
    from spec_jax.drafters.draft_model import draft_source

    kind, source = draft_source(opts, cfg)
    return f"{kind}: {source}"
