"""Recipe `structure`: AdaEAGLE's draft-length predictor (`spec_jax.drafters.structure`) for a trained tree
drafter, `eagle` or `draft_tree`, on the self-distillation data.

    python train/train_heads.py --config configs/structure_eagle_smollm2.yaml

Before training, the drafter (built through the method registry, as decoding builds it) reads the rows once,
teacher-forced (`examples`): at `starts_per_row` answer positions of each training row (4x as many on held-out
rows) it records the predictor's inputs at the root and the label, the number of draft tokens a greedy chain
gets accepted from there, capped at `structure_depth`: the run of draft == target agreements. The data is the
target's greedy output, so a run of agreements is exactly what greedy chain drafting accepts. Training is then
a regression on those rows (`structure.structure_loss`); the rows are a pure function of the data, the draft
and the seed, so an interrupted run resumes exactly. The final real tau drafts with the predictor through the
engine (checked token for token against AR).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters import structure as st
from spec_jax.errors import DataFormatError, InvalidArgumentError

CHUNK_ROWS = 8  # rows per teacher-forced pass when building the examples (one compiled shape)


def structure_parts(recipe, data, n_train: int, target, vocab):
    """The `structure` family's `Parts`: examples built once from the drafter, MSE regression, held-out
    MAE / exact hits / simulated cut cost, and the drafter with its predictor for the final tau."""
    from spec_jax.drafters import registry
    from spec_jax.training.recipes import Parts

    method = recipe.structure_method
    if method not in st.DRAFTERS:
        raise InvalidArgumentError(f"structure_method: must be one of {', '.join(st.DRAFTERS)}, got {method!r}")
    if recipe.draft_vocab:
        raise InvalidArgumentError("draft_vocab: the structure recipe trains on the draft's full vocabulary; set 0")
    built = registry.build(method, _options(recipe), target)
    drafter, weights = built.drafter, built.weights
    fingerprint = st.drafter_fingerprint(weights)
    run, offset, arrays = _EXAMPLES[method](drafter, weights, target, recipe.structure_depth)
    seed = recipe.train.seed
    train_x, train_y = examples(data, np.arange(n_train), recipe.starts_per_row, run, offset, arrays,
                                np.random.default_rng([seed, 1]), recipe.structure_depth)
    held_x, held_y = examples(data, np.arange(n_train, len(data)), 4 * recipe.starts_per_row, run, offset, arrays,
                              np.random.default_rng([seed, 2**31]), recipe.structure_depth)

    def batches(step, *, seed, batch_size):
        idx = np.random.default_rng([seed, step]).integers(0, len(train_y), batch_size)
        return {"inputs": train_x[idx], "labels": train_y[idx]}

    def evaluate(params, frozen, step):
        pred = np.asarray(st.predict_accepted(params, jnp.asarray(held_x)))
        return st.held_out_metrics(pred, held_y, drafter.tree.depth, recipe.structure_margin)

    def final_drafter(params, vocab):
        return (dataclasses.replace(drafter, structure=st.Structure(margin=recipe.structure_margin)),
                {**weights, st.HEAD_TYPE: jax.tree.map(jnp.asarray, params)})

    def save(path, params, meta, ranking):
        counts = {"train_examples": len(train_y), "held_out_examples": len(held_y),
                  "train_label_mean": round(float(train_y.mean()), 4)}
        return st.save_structure(path, params, {**meta, **counts}, method, fingerprint, recipe.structure_depth)

    params = st.init_structure(train_x.shape[1], recipe.structure_hidden, jax.random.key(seed))
    return Parts(params=params, frozen={}, loss_fn=lambda p, frozen, batch, rng: st.structure_loss(p, batch),
                 batches=batches, evaluate=evaluate, drafter=final_drafter, save=save)


def _options(recipe) -> dict:
    """The drafter's registry options: its weights (`structure_draft`, else the method's default), the final
    tau's tree, and no predictor (the one being trained is added by hand)."""
    where = {"eagle": "heads", "draft_tree": "draft_model"}[recipe.structure_method]
    return {where: recipe.structure_draft or None, "structure_head": st.OFF, "tree_depth": recipe.tau_depth,
            "tree_width": recipe.tau_width, "tree_k": recipe.tau_k, "tree_budget": recipe.tau_budget}


def examples(data, rows_R: np.ndarray, per_row: int, run, offset: int, arrays: list[str],
             rng: np.random.Generator, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [N, I], labels [N]) at `per_row` root positions p of each row whose first drafted token
    x_{p+offset} is an answer token; labels are the chain's accepted counts over `depth` steps (a step is
    scored only while its token is an answer token inside the row)."""
    xs, ys = [], []
    for i in range(0, len(rows_R), CHUNK_ROWS):
        rows = rows_R[i:i + CHUNK_ROWS]
        a = data.read(np.resize(rows, CHUNK_ROWS), ["tokens", "loss_mask", *arrays])  # padded by repeating rows
        mask = a.pop("loss_mask").astype(bool)
        tokens = a.pop("tokens").astype(np.int32)
        L = tokens.shape[1]
        starts = np.stack([_starts(mask[r], offset, per_row, rng, data, rows[r % len(rows)])
                           for r in range(CHUNK_ROWS)])
        x, hits = run({k: v.astype(np.float32) for k, v in a.items()}, tokens, starts)
        label_idx = starts[:, :, None] + offset + np.arange(depth)
        valid = (label_idx < L) & np.take_along_axis(mask, np.minimum(label_idx, L - 1).reshape(CHUNK_ROWS, -1),
                                                     1).reshape(label_idx.shape)
        n = len(rows)
        xs.append(np.asarray(x)[:n].reshape(-1, x.shape[-1]))
        ys.append(st.chain_labels(np.asarray(hits)[:n].reshape(-1, depth), valid[:n].reshape(-1, depth)))
    return np.concatenate(xs), np.concatenate(ys)


def _starts(mask_L: np.ndarray, offset: int, n: int, rng: np.random.Generator, data, row) -> np.ndarray:
    ok = np.nonzero(mask_L[offset:])[0]
    if ok.size == 0:
        raise DataFormatError(f"{data.path}: row {int(row)} has no answer token to train on")
    return np.sort(rng.choice(ok, n, replace=ok.size < n)).astype(np.int32)


def _take(a_BxLx, idx_BxS):
    return jnp.take_along_axis(a_BxLx, idx_BxS[..., None], axis=1)


def _eagle(drafter, weights, target, depth: int):
    """EAGLE's examples: root p reads (e(x_{p+1}), f_p) and the draft's step-0 logits at p; step j (training-time
    test's unroll, fed its own outputs) drafts x_{p+j+2}."""
    from spec_jax.drafters.eagle import readout, target_features, unroll
    from spec_jax.models import embed

    cfg, layers = target.cfg, drafter.feature_layers
    params = {k: v for k, v in weights.items() if k not in ("vocab", st.HEAD_TYPE)}
    arrays = [f"hidden_{i}" for i in sorted({*layers, cfg.num_layers})]

    @jax.jit
    def run(params, tparams, hidden, tokens_BxL, starts_BxS):
        L = tokens_BxL.shape[1]
        feats = target_features(params, tparams, cfg, layers, {i: hidden[f"hidden_{i}"] for i in layers},
                                hidden[f"hidden_{cfg.num_layers}"])
        outs = unroll(params, tparams, cfg, feats, jnp.pad(tokens_BxL[:, 1:], ((0, 0), (0, 1))), depth)
        hits, root = [], None
        for j, out in enumerate(outs):
            rows = jnp.minimum(starts_BxS + j, L - 1)
            logits = readout(params, tparams, cfg, _take(out, rows))
            root = logits if j == 0 else root
            label = jnp.take_along_axis(tokens_BxL, jnp.minimum(rows + 2, L - 1), 1)
            hits.append(jnp.argmax(logits, -1) == label)
        emb = embed(tparams, cfg, jnp.take_along_axis(tokens_BxL, jnp.minimum(starts_BxS + 1, L - 1), 1))
        return st.structure_inputs(emb, _take(feats, starts_BxS), root), jnp.stack(hits, -1)

    return (lambda hidden, tokens, starts: run(params, target.params, hidden, tokens, starts)), 2, arrays


def _draft_tree(drafter, weights, target, depth: int):
    """The draft model's examples: root c (the pending token x_c) reads e(x_c), the draft's last hidden state at
    c and its logits there; teacher-forced step j drafts x_{c+j+1}."""
    from spec_jax.models import embed, final_norm, forward, init_cache, lm_head

    dcfg = drafter.draft_cfg
    model = {k: v for k, v in weights.items() if k not in ("vocab", st.HEAD_TYPE)}

    @jax.jit
    def run(model, tokens_BxL, starts_BxS):
        B, L = tokens_BxL.shape
        positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        h = forward(model, dcfg, tokens_BxL, positions, init_cache(dcfg, B, L), compute_logits=False).final_hidden
        hits, root = [], None
        for j in range(depth):
            rows = jnp.minimum(starts_BxS + j, L - 1)
            logits = lm_head(model, dcfg, final_norm(model, dcfg, _take(h, rows)))
            root = logits if j == 0 else root
            hits.append(jnp.argmax(logits, -1) == jnp.take_along_axis(tokens_BxL, jnp.minimum(rows + 1, L - 1), 1))
        emb = embed(model, dcfg, jnp.take_along_axis(tokens_BxL, starts_BxS, 1))
        return st.structure_inputs(emb, _take(h, starts_BxS), root), jnp.stack(hits, -1)

    return (lambda hidden, tokens, starts: run(model, tokens, starts)), 1, []


_EXAMPLES = {"eagle": _eagle, "draft_tree": _draft_tree}
