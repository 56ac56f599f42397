"""Training recipes for draft heads: one YAML file, trained heads for one model.

    python train/train_heads.py --config configs/medusa_smollm2.yaml

A recipe file names the data store to learn from (`spec_jax.training.data`, made by `train/make_data.py`),
the head settings, a `train:` section (`TrainConfig`) and `out`, where the finished heads are written
(with their config, the data manifest's hash and the metrics). The last `eval_rows` rows of the store are
held out: the loop reports the simulated acceptance length on them as it trains, and at the end the heads
draft through the engine on held-out prompts for a real tau, checked token for token against AR.

Medusa trains on windows: `windows_per_row` answer positions t per row, each with the target's last hidden
state and the next K + 2 tokens, so the LM head (most of a step's cost with SmolLM2's 49,152 tokens) runs
only where a head is scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.checks import Range, read_yaml
from spec_jax.drafters.medusa import (
    TREE_NAMES,
    Medusa,
    heads_logits,
    heads_meta,
    init_heads,
    medusa_loss,
    save_heads,
    tree_paths,
)
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.training.config import TrainConfig, check_ranges, fields_from_mapping

RECIPES = ("medusa",)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A head recipe's settings (the YAML file's top-level keys; `train` is its `train:` section)."""

    recipe: str
    data: str
    out: str
    train: TrainConfig
    model: str = "smollm2-135m"
    dtype: str = "float32"
    num_heads: int = 4
    windows_per_row: int = 16
    eval_rows: int = 16
    tau_prompts: int = 4
    tau_tokens: int = 64
    tau_tree: str = "sim_8"

    RANGES = {"num_heads": Range(int, 1, 16), "windows_per_row": Range(int, 1), "eval_rows": Range(int, 1),
              "tau_prompts": Range(int, 0), "tau_tokens": Range(int, 1)}

    @classmethod
    def from_mapping(cls, data, source: str) -> Recipe:
        values = check_ranges(fields_from_mapping(cls, data, source, "recipe"), cls.RANGES, source)
        if values["recipe"] not in RECIPES:
            raise InvalidArgumentError(f"{source}: recipe: must be one of {', '.join(RECIPES)}, got "
                                       f"{values['recipe']!r}")
        if values.get("tau_tree", "sim_8") not in TREE_NAMES:
            raise InvalidArgumentError(f"{source}: tau_tree: unknown tree {values['tau_tree']!r}")
        values["train"] = TrainConfig.from_mapping(values["train"], source=f"{source} (train)")
        return cls(**values)


def load_recipe(path: str) -> Recipe:
    return Recipe.from_mapping(read_yaml(path, "--config"), source=f"config file {path}")


# ----------------------------------------------------------------------------- Medusa windows

def window_batch(data, rows_R: np.ndarray, width: int, per_row: int, rng: np.random.Generator,
                 layer: int) -> dict[str, np.ndarray]:
    """`per_row` windows per row: a start t where the first head's label (t + 2) is an answer token, then
    the hidden states, tokens and loss mask of positions t..t+width-1 ([R*per_row, width, ...])."""
    arrays = data.read(rows_R)
    tokens, mask, hidden = arrays["tokens"], arrays["loss_mask"].astype(bool), arrays[f"hidden_{layer}"]
    L = tokens.shape[1]
    starts = []
    for r in range(len(rows_R)):
        ok = np.nonzero(mask[r, 2:L - width + 2])[0] if L >= width else np.array([], np.int64)
        if ok.size == 0:
            raise DataFormatError(f"{data.path}: row {int(rows_R[r])} has no answer token to train on")
        starts.append(rng.choice(ok, per_row, replace=ok.size < per_row))
    starts_W = np.concatenate(starts)
    row_W = np.repeat(np.arange(len(rows_R)), per_row)
    idx_WxS = starts_W[:, None] + np.arange(width)[None]
    idx_WxS = np.minimum(idx_WxS, L - 1)
    return {"hidden": hidden[row_W[:, None], idx_WxS].astype(np.float32),
            "tokens": tokens[row_W[:, None], idx_WxS].astype(np.int32),
            "mask": mask[row_W[:, None], idx_WxS] & (starts_W[:, None] + np.arange(width)[None] < L)}


def medusa_acceptance(head_params, target_params, cfg, batch) -> dict:
    """Simulated acceptance on held-out windows: head k's top-1 against the token 2+k after the window's
    start, and the mean run of consecutive hits along the top-1 chain plus one (the tau of a chain of the
    heads' first choices, the pending token given)."""
    K = head_params["kernel"].shape[0]
    logits_WxKxV = heads_logits(head_params, target_params, cfg, jnp.asarray(batch["hidden"][:, 0]))
    top1_WxK = np.asarray(jnp.argmax(logits_WxKxV, axis=-1))
    labels_WxK, valid_WxK = batch["tokens"][:, 2:2 + K], batch["mask"][:, 2:2 + K]
    hit_WxK = (top1_WxK == labels_WxK) & valid_WxK
    run_W = np.cumprod(hit_WxK, axis=1).sum(axis=1)
    return {"sim_tau": float(1 + run_W.mean()),
            "head_top1": [float(hit_WxK[:, k].sum() / max(valid_WxK[:, k].sum(), 1)) for k in range(K)]}


def _loss_fn(cfg):
    def loss_fn(params, target, batch, rng):
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}  # every row's windows together
        total, per_head = medusa_loss(params, target, cfg, flat["hidden"], flat["tokens"], flat["mask"])
        return total, {"head_loss": per_head, "tokens": flat["mask"][:, 2:].sum()}
    return loss_fn


# ----------------------------------------------------------------------------- the recipe

def run_recipe(recipe: Recipe, target=None, progress: bool = True) -> dict:
    """Train the recipe's heads (resuming where its `train.output_dir` left off), evaluate them and write them
    to `recipe.out`; returns the metrics also saved there. `target` (`registry.Target`) is loaded from
    `recipe.model` when not given."""
    from spec_jax.training.data import TrainingData
    from spec_jax.training.loop import train

    data = TrainingData(recipe.data)
    if target is None:
        from spec_jax.decoding.setup import load_target

        target = load_target(recipe.model, recipe.dtype)
    cfg = target.cfg
    layer = cfg.num_layers
    if layer not in data.hidden_layers:
        raise DataFormatError(f"{recipe.data}: no hidden states of layer {layer} (the last layer's output, which "
                              f"Medusa heads read); make the data with --hidden-layers including {layer}")
    if recipe.eval_rows >= len(data):
        raise InvalidArgumentError(f"eval_rows {recipe.eval_rows} leaves no training rows of the {len(data)}")
    n_train = len(data) - recipe.eval_rows
    width = recipe.num_heads + 2

    def batches(step, *, seed, batch_size):  # [rows, windows_per_row, ...]: the loop shards the rows
        rows = data.batch_rows(step, batch_size, seed, limit=n_train)
        windows = window_batch(data, rows, width, recipe.windows_per_row, np.random.default_rng([seed, step]), layer)
        return {k: v.reshape(batch_size, recipe.windows_per_row, *v.shape[1:]) for k, v in windows.items()}

    held_out_rng = np.random.default_rng([recipe.train.seed, 2**31])  # apart from every training step's
    held_out = window_batch(data, np.arange(n_train, len(data)), width, recipe.windows_per_row, held_out_rng, layer)

    def evaluate(params, target_params, step):
        return medusa_acceptance(params, target_params, cfg, held_out)

    heads = init_heads(cfg, recipe.num_heads)
    result = train(recipe.train, _loss_fn(cfg), heads, target.params, batches, evaluate=evaluate,
                   progress=progress)
    metrics = {"final_loss": float(result.loss), "steps": int(result.step),
               **evaluate(result.params, target.params, result.step)}
    if recipe.tau_prompts:
        metrics.update(real_tau(result.params, target, data, n_train, recipe))
    meta = heads_meta(cfg, recipe=dataclasses.asdict(recipe) | {"train": dataclasses.asdict(recipe.train)},
                      data_manifest_sha256=hashlib.sha256((Path(recipe.data) / "manifest.json").read_bytes())
                      .hexdigest(), metrics=metrics)
    save_heads(recipe.out, result.params, meta)
    return metrics


def real_tau(head_params, target, data, n_train: int, recipe: Recipe) -> dict:
    """The heads drafting through the engine on held-out prompts (tree `tau_tree`): tau, and the output
    checked token for token against AR (greedy)."""
    from spec_jax.decoding import Engine, generate

    rows = data.read(np.arange(n_train, min(n_train + recipe.tau_prompts, len(data))))
    prompts = [list(map(int, t[: int(np.argmax(m))])) for t, m in zip(rows["tokens"], rows["loss_mask"],
                                                                          strict=True)]
    cfg = target.cfg
    K = int(head_params["kernel"].shape[0])
    paths = tree_paths(recipe.tau_tree, K)
    if max(map(len, paths)) > K:
        paths = tree_paths("chain", K)
    ar = generate(Engine(cfg), target.params, prompts, recipe.tau_tokens)
    gen = generate(Engine(cfg, Medusa(num_heads=K, paths=paths)), target.params, prompts, recipe.tau_tokens,
                   weights=jax.tree.map(jnp.asarray, head_params))
    if gen.token_ids != ar.token_ids:
        raise AssertionError("medusa output differs from AR under greedy decoding: a losslessness bug")
    stats = gen.stats()
    return {"real_tau": round(float(stats["tau"]), 3), "tau_tree": recipe.tau_tree, "tau_prompts": len(prompts)}


def summary_line(metrics: Mapping) -> str:
    return json.dumps({k: v for k, v in metrics.items() if k != "head_top1"}) + f" head_top1={metrics['head_top1']}"
