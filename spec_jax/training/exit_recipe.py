"""The early-exit recipe: exit adapters trained by self-distillation from the target's final layer (LayerSkip's
early-exit loss, Elhoushi et al. 2024, with its rotational and gradual curricula).

The target's layers stay frozen (the drafter reuses what its early layers compute), so only the adapters
(`early_exit.init_adapters`) train. Each training row gets `starts_per_row` fixed positions p where x_{p+1} is
an answer token; the exit states h_n there are computed once, before training, from the data store's nearest
stored layer below n (the frozen layers s..n-1 run causally over the whole row), and the target's distribution
of x_{p+1} comes from its last layer's stored state through the final norm and LM head.

Loss (LayerSkip §4.1 with the final layer's distribution as the teacher): sum over the exits enabled this step
of e_n * CE(p_target, q_n), with LayerSkip's "sum_l" scale e_n proportional to the cumulative sum of the
enabled exits' layer counts (deeper exits weigh more), normalised to 1. Curricula (which exits a step trains):
`none` (all), `rotational` (every `rotation`-th exit, the pattern shifted one exit per step; only those are
computed) and `gradual` (exits switch on from the deepest down, all on at half the training, LayerSkip's
percent scale 2; the deepest always on, as LayerSkip always trains the last layer).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters.early_exit import (
    EarlyExit,
    check_exit_layer,
    exit_logits,
    expected_tokens,
    init_adapters,
    save_exit_heads,
)
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.models import embed, forward_embeddings, head, init_cache, param_bytes
from spec_jax.policies import make_policy

CURRICULA = ("none", "rotational", "gradual")
MAX_K = 8  # the longest draft the default-exit choice considers


def check_exit_recipe(exit_layers, curriculum: str, source: str) -> tuple[int, ...]:
    """The recipe's exit layers as a sorted tuple (distinct counts >= 1) and its curriculum, refused clearly."""
    ok = isinstance(exit_layers, (list, tuple)) and all(not isinstance(n, bool) and isinstance(n, int) and n >= 1
                                                         for n in exit_layers)
    if not ok or len(set(exit_layers)) != len(exit_layers):
        raise InvalidArgumentError(f"{source}: exit_layers: expected a list of distinct layer counts >= 1, got "
                                   f"{exit_layers!r}")
    if curriculum not in CURRICULA:
        raise InvalidArgumentError(f"{source}: curriculum: must be one of {', '.join(CURRICULA)}, got {curriculum!r}")
    return tuple(sorted(exit_layers))


def enabled_exits(curriculum: str, num_exits: int, step: int, total_steps: int, rotation: int) -> np.ndarray:
    """[X] bool: which exits (in layer order) train at `step` under the curriculum (LayerSkip's C_rot,R / C_grad)."""
    i = np.arange(num_exits)
    if curriculum == "rotational":  # every R-th exit on, the pattern rolled one exit forward per step
        return (i - step) % rotation == 0
    if curriculum == "gradual":  # exit i switches on once 2 * step / total >= (X - i) / X; the deepest always on
        on = 2 * step / max(total_steps, 1) >= (num_exits - i) / num_exits
        return on | (i == num_exits - 1)
    return np.ones(num_exits, bool)


def loss_scales(exit_layers_S: jax.Array, on_S: jax.Array) -> jax.Array:
    """LayerSkip's "sum_l" scales of the enabled slots: the exit after n layers is weighted 1 + 2 + ... + n =
    n (n + 1) / 2, a fixed weight per exit whatever else is on (LayerSkip counts layers from 0, which gives the
    first layer's exit weight 0; counting from 1 keeps an exit after layer 1 trainable); the enabled ones are
    normalised to sum 1, disabled slots get 0 (facebookresearch/LayerSkip, early_exit_loss_scale_type sum_l)."""
    n_S = exit_layers_S.astype(jnp.float32)
    scale_S = jnp.where(on_S, n_S * (n_S + 1) / 2, 0.0)
    return scale_S / jnp.maximum(jnp.sum(scale_S), 1e-9)


# ----------------------------------------------------------------------------- exit states of the data

def fixed_positions(mask_RxL: np.ndarray, rows_R: np.ndarray, per_row: int, seed: int) -> np.ndarray:
    """[R, P] positions p per row where x_{p+1} is an answer token, fixed per row (its own rng)."""
    out = []
    for m, r in zip(mask_RxL.astype(bool), rows_R, strict=True):
        ok = np.nonzero(m[1:])[0]
        if ok.size == 0:
            raise DataFormatError(f"row {int(r)} has no answer token to train an exit on")
        rng = np.random.default_rng([seed, int(r)])
        out.append(np.sort(rng.choice(ok, per_row, replace=ok.size < per_row)))
    return np.stack(out).astype(np.int32)


def _sources(exit_layers, stored) -> dict[int, tuple[int, ...]]:
    """{start layer: exits computed from it}: each exit from the deepest stored state at or below it (0: the
    embeddings)."""
    groups: dict[int, list[int]] = {}
    for n in exit_layers:
        groups.setdefault(max([s for s in stored if s <= n], default=0), []).append(n)
    return {s: tuple(ns) for s, ns in groups.items()}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _run_layers(params, cfg, start: int, exits: tuple[int, ...], x_BxTxE, positions_BxP):
    """The frozen layers start..max(exits)-1 over whole rows; {n: h_n at the positions} ([B, P, E])."""
    B, T, _ = x_BxTxE.shape
    hidden = {start: x_BxTxE}
    if max(exits) > start:
        out = forward_embeddings(params, cfg, x_BxTxE, jnp.broadcast_to(jnp.arange(T), (B, T)), init_cache(cfg, B, T),
                                 layers=tuple(range(start, max(exits))), return_hidden=exits, compute_logits=False)
        hidden.update(out.hidden)
    take = lambda h: jnp.take_along_axis(h, positions_BxP[:, :, None], axis=1)  # noqa: E731
    return {n: take(hidden[n]) for n in exits}


def exit_states(data, rows_R: np.ndarray, positions_RxP: np.ndarray, exit_layers, target, chunk: int = 16) -> dict:
    """{"h_<n>": [R, P, E] float32 for each exit, "target_h": the last layer's state [R, P, E]} at the positions."""
    cfg, params = target.cfg, target.params
    L = cfg.num_layers
    groups = _sources(exit_layers, [s for s in data.hidden_layers if s < L])
    out: dict[str, list] = {}
    for lo in range(0, len(rows_R), chunk):
        rows = rows_R[lo: lo + chunk]
        pad = chunk - len(rows)
        names = ["tokens", *(f"hidden_{s}" for s in groups if s), f"hidden_{L}"]
        a = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in data.read(rows, names).items()}
        pos = jnp.asarray(np.pad(positions_RxP[lo: lo + chunk], [(0, pad), (0, 0)]))
        for s, ns in groups.items():
            x = embed(params, cfg, jnp.asarray(a["tokens"])) if s == 0 else jnp.asarray(a[f"hidden_{s}"], jnp.float32)
            for n, h in _run_layers(params, cfg, s, ns, x.astype(cfg.jnp_dtype), pos).items():
                out.setdefault(f"h_{n}", []).append(np.asarray(h, np.float32)[: len(rows)])
        last = np.asarray(a[f"hidden_{L}"], np.float32)
        out.setdefault("target_h", []).append(np.take_along_axis(last, np.asarray(pos)[:, :, None], 1)[: len(rows)])
    return {k: np.concatenate(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- loss and evaluation

def _target_logp(target_params, cfg, target_h, vocab):
    """The target's log-distribution at the positions (renormalised on a reduced vocabulary, as EAGLE-3 does)."""
    logits = jax.lax.stop_gradient(head(target_params, cfg, target_h))
    if vocab is not None:
        logits = jnp.take(logits, vocab["d2t"], axis=-1)
    return jax.nn.log_softmax(logits, axis=-1)


def exit_loss(params, frozen, batch, cfg, exit_layers: tuple[int, ...]):
    """(loss, aux): the LayerSkip-scaled soft cross-entropy of the enabled exits against the final layer.

    `batch`: `h` [B, S, P, E] exit states of the step's S exit slots, `slot` [B, S] their exit indices (layer
    order), `on` [B, S], `target_h` [B, P, E]. aux: per-exit CE and top-1 agreement ([X], 0 where off)."""
    tp, vocab = frozen["params"], frozen["vocab"]
    X = len(exit_layers)
    slot_S, on_S = batch["slot"][0], batch["on"][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"exit_{n}"] for n in exit_layers])
    t_logp = _target_logp(tp, cfg, batch["target_h"], vocab)
    t_top = jnp.argmax(t_logp, -1)
    scales_S = loss_scales(jnp.asarray(exit_layers)[slot_S], on_S)
    ces, accs = [], []
    for s in range(slot_S.shape[0]):
        adapter = jax.tree.map(lambda a, i=slot_S[s]: a[i], stacked)
        logp = jax.nn.log_softmax(exit_logits(adapter, tp, cfg, batch["h"][:, s], vocab), axis=-1)
        ces.append(-jnp.mean(jnp.sum(jnp.exp(t_logp) * logp, -1)))
        accs.append(jnp.mean(jnp.argmax(logp, -1) == t_top))
    ce_S, acc_S = jnp.stack(ces), jnp.stack(accs)
    per_exit = lambda v: jnp.zeros((X,), jnp.float32).at[slot_S].add(jnp.where(on_S, v, 0.0))  # noqa: E731
    return jnp.sum(scales_S * ce_S), {"exit_ce": per_exit(ce_S), "exit_top1": per_exit(acc_S),
                                      "tokens": jnp.float32(math.prod(batch["target_h"].shape[:2]))}


def held_out_agreement(params, frozen, cfg, states: dict, exit_layers) -> dict:
    """Per exit, top-1 agreement with the target and soft CE on the held-out positions."""
    tp, vocab = frozen["params"], frozen["vocab"]

    @jax.jit
    def one(adapter, h, target_h):
        t_logp = _target_logp(tp, cfg, target_h, vocab)
        logp = jax.nn.log_softmax(exit_logits(adapter, tp, cfg, h, vocab), -1)
        return (jnp.mean(jnp.argmax(logp, -1) == jnp.argmax(t_logp, -1)),
                -jnp.mean(jnp.sum(jnp.exp(t_logp) * logp, -1)))

    top1, ce = [], []
    for n in exit_layers:
        a, c = one(params[f"exit_{n}"], jnp.asarray(states[f"h_{n}"]), jnp.asarray(states["target_h"]))
        top1.append(round(float(a), 4))
        ce.append(round(float(c), 4))
    return {"exit_top1": top1, "exit_ce": ce}


def default_exit(target, exit_layers, top1, vocab_size: int | None = None) -> tuple[int, int, float]:
    """(exit, k, predicted speedup) by the share of weights a step reads: k + 1 partial forwards through n layers,
    k exit heads and one verification of the upper layers and the head, against AR's k-independent forward,
    at acceptance = the held-out agreement (`search-exit` measures this instead)."""
    cfg, params = target.cfg, target.params
    layer = sum(param_bytes(v) for k, v in params.items() if k.startswith("layers_")) / cfg.num_layers
    full_head = cfg.vocab_size * cfg.hidden_size * jnp.dtype(cfg.jnp_dtype).itemsize
    exit_head = full_head * (vocab_size or cfg.vocab_size) / cfg.vocab_size
    ar = cfg.num_layers * layer + full_head
    best = (0.0, exit_layers[-1], 1)
    for n, a in zip(exit_layers, top1, strict=True):
        for k in range(1, MAX_K + 1):
            cost = (k + 1) * n * layer + k * exit_head + (cfg.num_layers - n) * layer + full_head
            best = max(best, (expected_tokens(a, k) * ar / cost, n, k))
    return best[1], best[2], best[0]


# ----------------------------------------------------------------------------- the recipe's parts

def exit_parts(recipe, data, n_train: int, target, vocab):
    """Early exit: fixed positions per row, exit states computed once, the curriculum's exits each step."""
    from spec_jax.training.recipes import Parts, _need_layers

    cfg = target.cfg
    exits = recipe.exit_layers
    if not exits:
        raise InvalidArgumentError(f"{recipe.recipe} recipe: exit_layers is empty; name the exits to train")
    for n in exits:
        check_exit_layer(n, cfg, "exit_layers:")
    _need_layers(data, [cfg.num_layers], recipe, "the target's last layer, the teacher")
    X, P, seed = len(exits), recipe.starts_per_row, recipe.train.seed
    slots = X if recipe.curriculum != "rotational" else -(-X // recipe.rotation)
    all_rows = np.arange(len(data))
    positions = fixed_positions(data.read(all_rows, ["loss_mask"])["loss_mask"], all_rows, P, seed)
    states = exit_states(data, all_rows, positions, exits, target)
    train = {k: v[:n_train] for k, v in states.items()}
    held_out = {k: v[n_train:] for k, v in states.items()}
    frozen = {"params": target.params, "vocab": vocab}

    def batches(step, *, seed, batch_size):
        rows = data.batch_rows(step, batch_size, seed, limit=n_train)
        on_X = enabled_exits(recipe.curriculum, X, step, recipe.train.total_steps, recipe.rotation)
        slot_S = np.flatnonzero(on_X)[:slots]
        on_S = np.arange(slots) < slot_S.size
        slot_S = np.pad(slot_S, (0, slots - slot_S.size))
        h = np.stack([train[f"h_{exits[i]}"][rows] for i in slot_S], axis=1)
        return {"h": h, "target_h": train["target_h"][rows], "slot": np.tile(slot_S, (batch_size, 1)).astype(np.int32),
                "on": np.tile(on_S, (batch_size, 1))}

    def loss_fn(params, frozen, batch, rng):
        return exit_loss(params, frozen, batch, cfg, exits)

    def evaluate(params, frozen, step):
        return held_out_agreement(params, frozen, cfg, held_out, exits)

    def drafter(params, vocab):
        top1 = held_out_agreement(params, frozen, cfg, held_out, exits)["exit_top1"]
        n, k, _ = default_exit(target, exits, top1, None if vocab is None else int(vocab["d2t"].shape[0]))
        weights = {"adapter": jax.tree.map(jnp.asarray, params[f"exit_{n}"])}
        return EarlyExit(exit_layer=n, policy=make_policy("fixed", k)), weights | (
            {"vocab": vocab} if vocab is not None else {})

    def save(path, params, meta, ranking):
        top1 = meta["metrics"]["exit_top1"]
        n, k, speedup = default_exit(target, exits, top1, recipe.draft_vocab or None)
        meta = {**meta, "default_exit": n, "default_k": k, "predicted_speedup": round(speedup, 3)}
        return save_exit_heads(path, params, meta, recipe.adapter_rank, ranking)

    params = init_adapters(cfg, exits, recipe.adapter_rank, jax.random.key(seed))
    return Parts(params=params, frozen=frozen, loss_fn=loss_fn, batches=batches, evaluate=evaluate, drafter=drafter,
                 save=save)

