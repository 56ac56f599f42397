"""Draft-model distillation (DistillSpec, Zhou et al. 2024): a few decoder layers learn the target's
next-token distributions.

The draft has the target's width and tokenizer. Its layers start as copies of target layers (`init_layers`;
by default spread from the first to the last but one), and it shares the target's embeddings and LM head,
which stay frozen and are not stored with it (`draft_model.save_draft`). It learns to match the target's
distribution under a chosen divergence. DistillSpec found that the best one depends on the task and on the
decoding strategy, so the divergence is a setting (`DIVERGENCES`).

The training data comes from two places, mixed in every batch:

- fixed: the self-distillation store's rows (the target's own greedy answers). The target's
  distribution comes from its stored last hidden state through the frozen head, and is scored at
  `starts_per_row` answer positions of each row.
- on-policy (`onpolicy_rows` > 0): for that many rows, the draft samples `onpolicy_tokens` tokens after a
  prefix of the row, and the target scores them. DistillSpec found this data to matter: the draft learns
  on the sequences it will actually draft. The target runs a forward over these rows every step, so they
  cost far more than fixed rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.errors import InvalidArgumentError
from spec_jax.models import Config, forward, head, init_cache

DIVERGENCES = ("fkl", "rkl", "tv", "jsd")  # forward KL(p||q), reverse KL(q||p), total variation, Jensen-Shannon


def divergence(p_logits_NxV: jax.Array, q_logits_NxV: jax.Array, kind: str) -> jax.Array:
    """[N] divergence between the target's distributions p and the draft's q, from their logits."""
    logp = jax.nn.log_softmax(p_logits_NxV.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(q_logits_NxV.astype(jnp.float32), axis=-1)
    p, q = jnp.exp(logp), jnp.exp(logq)
    if kind == "fkl":
        return jnp.sum(p * (logp - logq), axis=-1)
    if kind == "rkl":
        return jnp.sum(q * (logq - logp), axis=-1)
    if kind == "tv":
        return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
    if kind == "jsd":
        logm = jnp.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * jnp.sum(p * (logp - logm), axis=-1) + 0.5 * jnp.sum(q * (logq - logm), axis=-1)
    raise InvalidArgumentError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def default_init_layers(cfg: Config, n: int) -> tuple[int, ...]:
    """`n` target layers spread evenly from the first to the last but one: the draft's starting layers.

    The last layer is left out: it is tuned to read the residual stream of all the layers before it. For
    SmolLM2-135M, a draft of layers (0, 29) starts 63 nats of forward KL from the target, (0, 28) 15, (0, 1)
    16 (8 rows x 64 answer positions of the self-distillation set)."""
    if not 1 <= n < cfg.num_layers:
        raise InvalidArgumentError(f"a draft of {n} layers cannot start from a {cfg.num_layers}-layer target; give "
                                   f"fewer layers than the target's")
    last = cfg.num_layers - 2
    return (0,) if n == 1 else tuple(int(round(i * last / (n - 1))) for i in range(n))


def init_draft(target_params, cfg: Config, layers: tuple[int, ...]) -> tuple[dict, Config]:
    """(the draft's own parameters, its Config): copies of target `layers` and of the final norm."""
    bad = [i for i in layers if not 0 <= i < cfg.num_layers]
    if not layers or bad:
        raise InvalidArgumentError(f"init_layers {list(layers)}: give target layer indices in [0, {cfg.num_layers})")
    own = {f"layers_{i}": target_params[f"layers_{layer}"] for i, layer in enumerate(layers)}
    own["norm"] = target_params["norm"]
    return jax.tree.map(jnp.array, own), cfg.replace(num_layers=len(layers))


def draft_hidden(params, dcfg: Config, tokens_BxT: jax.Array) -> jax.Array:
    """[B, T, E]: the draft's last hidden state over whole rows (causal, from an empty cache)."""
    B, T = tokens_BxT.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    return forward(params, dcfg, tokens_BxT, positions, init_cache(dcfg, B, T), compute_logits=False).final_hidden


def _gather(x_BxTxE, idx_BxS):
    return jnp.take_along_axis(x_BxTxE, idx_BxS[..., None], axis=1)


def fixed_terms(params, target_params, dcfg: Config, cfg: Config, batch: dict, kind: str):
    """([B, S] divergences, [B, S] weights) at the rows' scored positions t: the draft's and the target's
    distributions of token t + 1 (an answer token)."""
    positions_BxS = batch["starts"] + 1  # row_batch's starts r have x_{r+2} an answer token: predict it from r+1
    h_BxSxE = _gather(draft_hidden(params, dcfg, batch["tokens"]), positions_BxS)
    p_logits = jax.lax.stop_gradient(head(target_params, cfg, _gather(batch["hidden"], positions_BxS)))
    d = divergence(p_logits, head(params, dcfg, h_BxSxE), kind)
    return d, jnp.ones_like(d)


def sample_continuations(params, dcfg: Config, tokens_RxW, cut_R, n: int, rng) -> jax.Array:
    """The rows with `n` tokens sampled from the draft (temperature 1) written after each prefix
    tokens[:cut]: the sequences the draft itself would draft."""
    R, W = tokens_RxW.shape
    positions = jnp.broadcast_to(jnp.arange(W), (R, W))
    out = forward(params, dcfg, tokens_RxW, positions, init_cache(dcfg, R, W), logits_at=(cut_R - 1)[:, None])
    rows = jnp.arange(R)

    def body(carry, key):
        tokens, cache, logits_RxV, at_R = carry
        x_R = jax.random.categorical(key, logits_RxV).astype(jnp.int32)
        tokens = tokens.at[rows, at_R].set(x_R)
        o = forward(params, dcfg, x_R[:, None], at_R[:, None], cache.replace(lengths=at_R))
        return (tokens, o.cache, o.logits[:, 0], at_R + 1), None

    (tokens, *_), _ = jax.lax.scan(body, (tokens_RxW, out.cache, out.logits[:, 0], cut_R), jax.random.split(rng, n))
    return tokens


def onpolicy_terms(params, target_params, dcfg: Config, cfg: Config, batch: dict, n: int, kind: str, rng):
    """([R, n] divergences, weights) on `n` tokens the draft samples after each on-policy row's prefix, the
    target scoring the same sequences (its forward runs over the rows; no gradient flows through sampling)."""
    tokens_RxW, cut_R = batch["op_tokens"], batch["op_cut"]
    R, W = tokens_RxW.shape
    seq = sample_continuations(jax.lax.stop_gradient(params), dcfg, tokens_RxW, cut_R, n, rng)
    at_RxN = cut_R[:, None] - 1 + jnp.arange(n)[None]  # the positions that predict the sampled tokens
    positions = jnp.broadcast_to(jnp.arange(W), (R, W))
    target_h = forward(target_params, cfg, seq, positions, init_cache(cfg, R, W), compute_logits=False).final_hidden
    p_logits = jax.lax.stop_gradient(head(target_params, cfg, _gather(target_h, at_RxN)))
    q_logits = head(params, dcfg, _gather(draft_hidden(params, dcfg, seq), at_RxN))
    d = divergence(p_logits, q_logits, kind)
    return d, jnp.ones_like(d)


def answer_starts(data, rows_R: np.ndarray) -> np.ndarray:
    """[R] each row's prompt length (where its answer starts; 0 for a row without an answer)."""
    mask = data.read(rows_R, ["loss_mask"])["loss_mask"].astype(bool)
    return np.where(mask.any(1), np.argmax(mask, 1), 0)


def onpolicy_rows(data, rows_R: np.ndarray, width: int, n: int, rng: np.random.Generator) -> dict:
    """Prefixes for on-policy rows (each with room: its prompt ends at most `n` tokens before `width`): each
    row cut at a random point from its answer's start on, so the `n` sampled tokens fit ([R, width] tokens and
    [R] cut points)."""
    tokens = data.read(rows_R, ["tokens"])["tokens"][:, :width].astype(np.int32)
    start_R = answer_starts(data, rows_R)
    return {"op_tokens": tokens, "op_cut": rng.integers(start_R, width - n + 1).astype(np.int32)}


def agreement(params, target_params, dcfg: Config, cfg: Config, held_out: dict, k: int) -> dict:
    """Held-out acceptance of the draft on the target's greedy answers (teacher-forced, so exactly what greedy
    chain drafting accepts): top-1 agreement, the expected acceptance rate under sampling (1 - TV), and the
    tau of a `k`-token chain (1 + mean run of consecutive agreements from each answer position)."""
    def row(args):
        tokens_T, hidden_TxE = args
        h = draft_hidden(params, dcfg, tokens_T[None])[0]
        p, q = head(target_params, cfg, hidden_TxE), head(params, dcfg, h)
        tv = 0.5 * jnp.sum(jnp.abs(jax.nn.softmax(p) - jax.nn.softmax(q)), -1)
        return jnp.argmax(p, -1) == jnp.argmax(q, -1), tv

    agree_RxT, tv_RxT = jax.jit(lambda t, h: jax.lax.map(row, (t, h)))(held_out["tokens"], held_out["hidden"])
    agree_RxT, tv_RxT = np.asarray(agree_RxT), np.asarray(tv_RxT)
    scored_RxT = np.zeros_like(held_out["mask"])
    scored_RxT[:, :-1] = held_out["mask"][:, 1:]  # position t predicts answer token t + 1
    hit = agree_RxT & scored_RxT
    run = np.zeros(hit.shape, np.int64)  # run[t]: consecutive hits from t on, capped at k
    alive = np.ones(hit.shape, bool)
    for j in range(k):
        step = np.zeros(hit.shape, bool)
        step[:, : hit.shape[1] - j] = hit[:, j:]
        alive &= step
        run += alive
    return {"top1_agreement": float(hit.sum() / scored_RxT.sum()),
            "accept_rate": float(1 - tv_RxT[scored_RxT].mean()),
            "sim_tau": float(1 + run[scored_RxT].mean())}


def draft_parts(recipe, data, n_train: int, target, vocab):
    """The `draft` recipe family for `recipes.run_recipe`: a draft model distilled from the target."""
    from spec_jax.drafters.draft_model import DraftModel, save_draft, share_embeddings
    from spec_jax.policies import FixedLength
    from spec_jax.training.recipes import Parts, _need_layers, row_batch

    cfg = target.cfg
    _need_layers(data, [cfg.num_layers], recipe, "the target's last layer, whose distribution the draft learns")
    if recipe.divergence not in DIVERGENCES:
        raise InvalidArgumentError(f"{recipe.data}: divergence: choose one of {', '.join(DIVERGENCES)}, got "
                                   f"{recipe.divergence!r}")
    layers = recipe.init_layers or default_init_layers(cfg, recipe.draft_layers)
    if len(layers) != recipe.draft_layers:
        raise InvalidArgumentError(f"{recipe.data}: init_layers {list(layers)} name {len(layers)} layers but "
                                   f"draft_layers is {recipe.draft_layers}; make them agree")
    own, dcfg = init_draft(target.params, cfg, layers)
    hidden = f"hidden_{cfg.num_layers}"
    n_op, width = recipe.onpolicy_rows, min(recipe.onpolicy_width, data.seq_len)
    if n_op > recipe.train.batch_size:
        raise InvalidArgumentError(f"onpolicy_rows {n_op} > batch_size {recipe.train.batch_size}: the on-policy rows "
                                   "travel in each batch's rows")
    roomy = np.arange(n_train)  # rows whose prompt leaves room for the sampled tokens
    if n_op:
        roomy = roomy[(answer_starts(data, roomy) > 0) & (answer_starts(data, roomy) <= width - recipe.onpolicy_tokens)]
        if roomy.size < n_op:
            raise InvalidArgumentError(f"{recipe.data}: only {roomy.size} training rows have a prompt short enough to "
                                       f"sample {recipe.onpolicy_tokens} on-policy tokens within {width}; raise "
                                       "onpolicy_width or lower onpolicy_tokens")

    def batches(step, *, seed, batch_size):
        rows = data.batch_rows(step, batch_size, seed, limit=n_train)
        rng = np.random.default_rng([seed, step])
        b = row_batch(data, rows, [hidden], recipe.starts_per_row, rng)
        b = {"hidden": b.pop(hidden), **b}
        if n_op:  # n_op on-policy prefixes, padded to the batch's rows (the loop splits every array by rows)
            op = onpolicy_rows(data, rng.choice(roomy, n_op, replace=False), width, recipe.onpolicy_tokens, rng)
            b["op_tokens"] = np.zeros((batch_size, width), np.int32)
            b["op_cut"] = np.full(batch_size, width - recipe.onpolicy_tokens, np.int32)
            b["op_tokens"][:n_op], b["op_cut"][:n_op] = op["op_tokens"], op["op_cut"]
            b["op_mask"] = np.arange(batch_size) < n_op
        return b

    def loss_fn(params, frozen, batch, rng):
        full = share_embeddings(params, frozen, cfg)
        d, w = fixed_terms(full, frozen, dcfg, cfg, batch, recipe.divergence)
        total, count = jnp.sum(d * w), jnp.sum(w)
        aux = {"fixed_div": jnp.sum(d * w) / jnp.sum(w)}
        if n_op:
            take = jnp.nonzero(batch["op_mask"], size=n_op)[0]  # static count: the rows flagged on-policy
            op = {k: batch[k][take] for k in ("op_tokens", "op_cut")}
            d_op, w_op = onpolicy_terms(full, frozen, dcfg, cfg, op, recipe.onpolicy_tokens, recipe.divergence, rng)
            total, count = total + jnp.sum(d_op * w_op), count + jnp.sum(w_op)
            aux["onpolicy_div"] = jnp.sum(d_op * w_op) / jnp.sum(w_op)
        return total / count, {**aux, "tokens": count}

    held_out = row_batch(data, np.arange(n_train, len(data)), [hidden], 1, np.random.default_rng(0))
    held_out = {"tokens": held_out["tokens"], "hidden": held_out.pop(hidden), "mask": held_out["mask"]}

    def evaluate(params, frozen, step):
        return agreement(share_embeddings(params, frozen, cfg), frozen, dcfg, cfg, held_out, recipe.sim_steps)

    def drafter(params, vocab):
        weights = share_embeddings(jax.tree.map(jnp.asarray, params), target.params, cfg)
        weights |= {"vocab": vocab} if vocab is not None else {}
        return DraftModel(draft_cfg=dcfg, policy=FixedLength(recipe.sim_steps)), weights

    def save(path, params, meta, ranking):
        return save_draft(path, params, {**meta, "init_layers": list(layers)}, ranking, target.tokenizer)

    return Parts(params=own, frozen=target.params, loss_fn=loss_fn, batches=batches, evaluate=evaluate,
                 drafter=drafter, save=save)
