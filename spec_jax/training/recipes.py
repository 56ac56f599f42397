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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

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

RECIPES = ("medusa", "hydra", "eagle", "draft", "structure", "specdecpp", "early_exit")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A head recipe's settings (the YAML file's top-level keys; `train` is its `train:` section).

    Shared: `recipe` (the head family), `data`, `out`, `model`, `dtype`, `eval_rows` (the last rows of the
    store, held out), `tau_prompts` / `tau_tokens` (the final real tau through the engine), `draft_vocab` (a
    reduced draft vocabulary of that many tokens for the final tau and, for EAGLE, training; 0: full).
    Medusa and Hydra: `num_heads`, `windows_per_row`, `tau_tree`; Hydra also `head_layers` (residual blocks
    per head), `prefix_layer` (Hydra++'s extra decoder layer) and `teacher` (soft targets from the target's
    distribution, else its greedy tokens). EAGLE: `feature_layers` (empty: EAGLE-1;
    three layers: EAGLE-3), `ttt_steps` (training-time test), `regression` / `soft_ce` (loss weights),
    `noise`, `starts_per_row` (rows scored by the LM head), `sim_steps` (chain length of the held-out sim_tau)
    and `tau_depth` / `tau_width` / `tau_k` / `tau_budget` (the dynamic tree of the final tau).
    Structure (`structure_recipe`): `structure_method` (eagle or draft_tree), `structure_draft` (its draft: --heads
    or --draft-model; empty: the method's default), `structure_depth` (labels capped there), `structure_hidden`
    (MLP width), `structure_margin` (levels past the prediction), with `starts_per_row` and the `tau_*` tree.
    """

    recipe: str
    data: str
    out: str
    train: TrainConfig
    model: str = "smollm2-135m"
    dtype: str = "float32"
    eval_rows: int = 16
    tau_prompts: int = 4
    tau_tokens: int = 64
    draft_vocab: int = 0
    num_heads: int = 4
    windows_per_row: int = 16
    tau_tree: str = "sim_8"
    head_layers: int = 1
    prefix_layer: bool = False
    teacher: bool = True
    feature_layers: tuple[int, ...] = ()
    ttt_steps: int = 1
    regression: float = 1.0
    soft_ce: float = 0.1
    noise: float = 0.2
    starts_per_row: int = 32
    sim_steps: int = 5
    tau_depth: int = 5
    tau_width: int = 4
    tau_k: int = 4
    tau_budget: int = 16
    # draft (a distilled draft model, `spec_jax.training.distill`)
    draft_layers: int = 2
    init_layers: tuple[int, ...] = ()
    divergence: str = "fkl"
    onpolicy_rows: int = 0
    onpolicy_tokens: int = 32
    onpolicy_width: int = 192
    # structure (AdaEAGLE's draft-length predictor, `spec_jax.training.structure_recipe`)
    structure_method: str = "eagle"
    structure_draft: str = ""
    structure_depth: int = 5
    structure_hidden: int = 256
    structure_margin: int = 1
    # specdecpp (SpecDec++'s acceptance head for a draft model, `spec_jax.training.acceptance_recipe`)
    acc_draft_model: str = ""
    acc_draft_layers: int = 0
    acc_blocks: int = 3
    acc_reject_weight: float = 6.0
    acc_mixing: float = 0.15
    acc_greedy: bool = False
    acc_threshold: float = 0.3
    acc_min_k: int = 2
    acc_max_k: int = 20
    # early_exit (exit adapters trained by self-distillation, `spec_jax.training.exit_recipe`)
    exit_layers: tuple[int, ...] = ()
    adapter_rank: int = 128
    curriculum: str = "none"
    rotation: int = 2

    RANGES = {"num_heads": Range(int, 1, 16), "windows_per_row": Range(int, 1), "eval_rows": Range(int, 1),
              "tau_prompts": Range(int, 0), "tau_tokens": Range(int, 1), "draft_vocab": Range(int, 0),
              "ttt_steps": Range(int, 1, 16), "regression": Range(float, 0), "soft_ce": Range(float, 0),
              "noise": Range(float, 0), "starts_per_row": Range(int, 1), "sim_steps": Range(int, 1, 16),
              "tau_depth": Range(int, 1), "tau_width": Range(int, 1), "tau_k": Range(int, 1),
              "tau_budget": Range(int, 1), "head_layers": Range(int, 1, 8),
              "draft_layers": Range(int, 1, 64), "onpolicy_rows": Range(int, 0), "onpolicy_tokens": Range(int, 1),
              "onpolicy_width": Range(int, 2),
              "structure_depth": Range(int, 1, 16), "structure_hidden": Range(int, 1),
              "structure_margin": Range(int, 0),
              "acc_draft_layers": Range(int, 0, 64), "acc_blocks": Range(int, 0, 16),
              "acc_reject_weight": Range(float, 0), "acc_mixing": Range(float, 0, 1),
              "acc_threshold": Range(float, 0, 1), "acc_min_k": Range(int, 1), "acc_max_k": Range(int, 1),
              "adapter_rank": Range(int, 1, 4096), "rotation": Range(int, 1)}

    @classmethod
    def from_mapping(cls, data, source: str) -> Recipe:
        values = check_ranges(fields_from_mapping(cls, data, source, "recipe"), cls.RANGES, source)
        if values["recipe"] not in RECIPES:
            raise InvalidArgumentError(f"{source}: recipe: must be one of {', '.join(RECIPES)}, got "
                                       f"{values['recipe']!r}")
        if values.get("tau_tree", "sim_8") not in TREE_NAMES:
            raise InvalidArgumentError(f"{source}: tau_tree: unknown tree {values['tau_tree']!r}")
        layers = values.get("feature_layers", ())
        if not isinstance(layers, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 1
                                                         for i in layers):
            raise InvalidArgumentError(f"{source}: feature_layers: expected a list of layer counts >= 1 (EAGLE-3's "
                                       f"low, middle and high layers), got {layers!r}")
        values["feature_layers"] = tuple(layers)
        init = values.get("init_layers", ())
        if not isinstance(init, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                       for i in init):
            raise InvalidArgumentError(f"{source}: init_layers: expected a list of target layer indices (the "
                                       f"draft's starting layers), got {init!r}")
        values["init_layers"] = tuple(init)
        from spec_jax.training.exit_recipe import check_exit_recipe

        values["exit_layers"] = check_exit_recipe(values.get("exit_layers", ()), values.get("curriculum", "none"),
                                                  source)
        for flag in ("prefix_layer", "teacher", "acc_greedy"):
            if not isinstance(values.get(flag, False), bool):
                raise InvalidArgumentError(f"{source}: {flag}: expected true or false, got {values[flag]!r}")
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


class Parts(NamedTuple):
    """What a head family brings to `run_recipe`."""

    params: Any  # the initial trainable parameters
    frozen: Any  # the loop's non-differentiated input: the target's parameters (and a reduced vocabulary)
    loss_fn: Callable  # loss_fn(params, frozen, batch, rng) -> (loss, aux)
    batches: Callable  # batches(step, *, seed, batch_size)
    evaluate: Callable  # evaluate(params, frozen, step) -> host metrics on held-out data
    drafter: Callable  # drafter(params, vocab) -> (Drafter, weights) for the final real tau
    save: Callable  # save(path, params, meta, ranking)


def _need_layers(data, layers, recipe: Recipe, why: str) -> None:
    missing = sorted(set(layers) - set(data.hidden_layers))
    if missing:
        raise DataFormatError(f"{recipe.data}: no hidden states of layers {missing} ({why}); make the data with "
                              f"--hidden-layers including them")


def medusa_parts(recipe: Recipe, data, n_train: int, target, vocab) -> Parts:
    """Medusa: windows of the last layer's hidden states, cross-entropy per head."""
    cfg, layer = target.cfg, target.cfg.num_layers
    _need_layers(data, [layer], recipe, "the last layer's output, which Medusa heads read")
    width = recipe.num_heads + 2

    def batches(step, *, seed, batch_size):  # [rows, windows_per_row, ...]: the loop shards the rows
        rows = data.batch_rows(step, batch_size, seed, limit=n_train)
        windows = window_batch(data, rows, width, recipe.windows_per_row, np.random.default_rng([seed, step]), layer)
        return {k: v.reshape(batch_size, recipe.windows_per_row, *v.shape[1:]) for k, v in windows.items()}

    held_out_rng = np.random.default_rng([recipe.train.seed, 2**31])  # apart from every training step's
    held_out = window_batch(data, np.arange(n_train, len(data)), width, recipe.windows_per_row, held_out_rng, layer)

    def loss_fn(params, target_params, batch, rng):
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}  # every row's windows together
        total, per_head = medusa_loss(params, target_params, cfg, flat["hidden"], flat["tokens"], flat["mask"])
        return total, {"head_loss": per_head, "tokens": flat["mask"][:, 2:].sum()}

    def drafter(params, vocab):
        K = int(params["kernel"].shape[0])
        paths = tree_paths(recipe.tau_tree, K)
        if max(map(len, paths)) > K:
            paths = tree_paths("chain", K)
        weights = jax.tree.map(jnp.asarray, params) | ({"vocab": vocab} if vocab is not None else {})
        return Medusa(num_heads=K, paths=paths), weights

    return Parts(params=init_heads(cfg, recipe.num_heads), frozen=target.params, loss_fn=loss_fn, batches=batches,
                 evaluate=lambda params, frozen, step: medusa_acceptance(params, frozen, cfg, held_out),
                 drafter=drafter, save=save_heads)


def row_batch(data, rows_R: np.ndarray, arrays: list[str], starts_per_row: int, rng: np.random.Generator) -> dict:
    """Whole rows (tokens, mask, the hidden states named) and `starts_per_row` rows r per row where the token
    x_{r+2} is an answer token: where EAGLE's draft is scored (the LM head is costly)."""
    a = data.read(rows_R, ["tokens", "loss_mask", *arrays])
    mask = a.pop("loss_mask").astype(bool)
    starts = []
    for r in range(len(rows_R)):
        ok = np.nonzero(mask[r, 2:])[0]
        if ok.size == 0:
            raise DataFormatError(f"{data.path}: row {int(rows_R[r])} has no answer token to train on")
        starts.append(np.sort(rng.choice(ok, starts_per_row, replace=ok.size < starts_per_row)))
    out = {k: v.astype(np.float32) for k, v in a.items() if k.startswith("hidden_")}
    return {**out, "tokens": a["tokens"].astype(np.int32), "mask": mask, "starts": np.stack(starts).astype(np.int32)}


def eagle_parts(recipe: Recipe, data, n_train: int, target, vocab) -> Parts:
    """EAGLE: whole rows of the feature layers' hidden states (and the last layer's, for the target's
    distribution), `eagle_loss` with training-time test, held-out simulated chain acceptance."""
    from spec_jax.drafters.dynamic_tree import DynamicTree
    from spec_jax.drafters.eagle import Eagle, chain_acceptance, eagle_loss, init_eagle, save_eagle

    cfg, layers = target.cfg, recipe.feature_layers
    _need_layers(data, [*layers, cfg.num_layers], recipe, "the EAGLE features and the target's last layer")
    arrays = [f"hidden_{i}" for i in sorted({*layers, cfg.num_layers})]
    kw = dict(feature_layers=layers)

    def batches(step, *, seed, batch_size):
        rows = data.batch_rows(step, batch_size, seed, limit=n_train)
        return row_batch(data, rows, arrays, recipe.starts_per_row, np.random.default_rng([seed, step]))

    held_out = row_batch(data, np.arange(n_train, len(data)), arrays, recipe.starts_per_row,
                         np.random.default_rng([recipe.train.seed, 2**31]))

    def loss_fn(params, frozen, batch, rng):
        return eagle_loss(params, frozen["params"], cfg, batch, rng, steps=recipe.ttt_steps,
                          regression=recipe.regression, soft_ce=recipe.soft_ce, noise=recipe.noise,
                          vocab=frozen["vocab"], **kw)

    def evaluate(params, frozen, step):
        return chain_acceptance(params, frozen["params"], cfg, held_out, steps=recipe.sim_steps,
                                vocab=frozen["vocab"], **kw)

    def drafter(params, vocab):
        tree = DynamicTree(depth=recipe.tau_depth, width=recipe.tau_width, k=recipe.tau_k, budget=recipe.tau_budget)
        weights = jax.tree.map(jnp.asarray, params) | ({"vocab": vocab} if vocab is not None else {})
        return Eagle(feature_layers=layers, tree=tree), weights

    def save(path, params, meta, ranking):
        return save_eagle(path, params, meta, layers, ranking)

    params = init_eagle(cfg, jax.random.key(recipe.train.seed), layers)
    return Parts(params=params, frozen={"params": target.params, "vocab": vocab}, loss_fn=loss_fn, batches=batches,
                 evaluate=evaluate, drafter=drafter, save=save)


def hydra_parts(recipe: Recipe, data, n_train: int, target, vocab) -> Parts:
    """Hydra: whole rows of the last layer's hidden states (the prefix layer runs over them) with
    `windows_per_row` scored starts, the teacher loss, held-out simulated chain acceptance."""
    from spec_jax.drafters import hydra

    cfg, layer = target.cfg, target.cfg.num_layers
    _need_layers(data, [layer], recipe, "the last layer's output, which Hydra heads read")

    def as_hydra(batch):
        return {"hidden": batch.pop(f"hidden_{layer}"), **batch}

    def batches(step, *, seed, batch_size):
        rows = data.batch_rows(step, batch_size, seed, limit=n_train)
        return as_hydra(row_batch(data, rows, [f"hidden_{layer}"], recipe.windows_per_row,
                                  np.random.default_rng([seed, step])))

    held_out = as_hydra(row_batch(data, np.arange(n_train, len(data)), [f"hidden_{layer}"], recipe.windows_per_row,
                                  np.random.default_rng([recipe.train.seed, 2**31])))

    def loss_fn(params, target_params, batch, rng):
        total, per_head = hydra.hydra_loss(params, target_params, cfg, batch["hidden"], batch["tokens"],
                                           batch["mask"], batch["starts"], teacher=recipe.teacher)
        labels_BxW = jnp.take_along_axis(batch["mask"], jnp.minimum(batch["starts"] + 2, batch["mask"].shape[1] - 1), 1)
        return total, {"head_loss": per_head, "tokens": jnp.sum(labels_BxW & (batch["starts"] >= 0))}

    def drafter(params, vocab):
        K, layers, prefix = hydra.head_settings(params)
        paths = tree_paths(recipe.tau_tree, K)
        if max(map(len, paths)) > K:
            paths = tree_paths("chain", K)
        weights = jax.tree.map(jnp.asarray, params) | ({"vocab": vocab} if vocab is not None else {})
        return hydra.Hydra(num_heads=K, head_layers=layers, prefix_layer=prefix, paths=paths), weights

    params = hydra.init_heads(cfg, recipe.num_heads, jax.random.key(recipe.train.seed), head_layers=recipe.head_layers,
                              prefix_layer=recipe.prefix_layer)
    return Parts(params=params, frozen=target.params, loss_fn=loss_fn, batches=batches,
                 evaluate=lambda params, frozen, step: hydra.hydra_acceptance(params, frozen, cfg, held_out),
                 drafter=drafter, save=hydra.save_heads)


def draft_parts(*args) -> Parts:
    """A draft model distilled from the target (`spec_jax.training.distill`)."""
    from spec_jax.training.distill import draft_parts

    return draft_parts(*args)


def structure_parts(*args) -> Parts:
    """AdaEAGLE's draft-length predictor for a tree drafter (`spec_jax.training.structure_recipe`)."""
    from spec_jax.training.structure_recipe import structure_parts

    return structure_parts(*args)


def specdecpp_parts(*args) -> Parts:
    """SpecDec++'s acceptance-prediction head for a draft model (`spec_jax.training.acceptance_recipe`)."""
    from spec_jax.training.acceptance_recipe import specdecpp_parts

    return specdecpp_parts(*args)


def exit_parts(*args) -> Parts:
    """Early-exit adapters trained by self-distillation from the final layer (`spec_jax.training.exit_recipe`)."""
    from spec_jax.training.exit_recipe import exit_parts

    return exit_parts(*args)


FAMILIES: dict[str, Callable[..., Parts]] = {"medusa": medusa_parts, "hydra": hydra_parts, "eagle": eagle_parts,
                                             "draft": draft_parts,
                                             "structure": structure_parts, "specdecpp": specdecpp_parts,
                                             "early_exit": exit_parts}


# ----------------------------------------------------------------------------- the recipe

def run_recipe(recipe: Recipe, target=None, progress: bool = True) -> dict:
    """Train the recipe's heads (resuming where its `train.output_dir` left off), evaluate them and write them
    to `recipe.out` with the token ranking of the training data (for `--draft-vocab`); returns the metrics
    also saved there. `target` (`registry.Target`) is loaded from `recipe.model` when not given."""
    from spec_jax.drafters.vocab import count_answer_tokens, reduced_vocab, token_ranking
    from spec_jax.training.data import TrainingData
    from spec_jax.training.loop import train

    data = TrainingData(recipe.data)
    if target is None:
        from spec_jax.decoding.setup import load_target

        target = load_target(recipe.model, recipe.dtype)
    cfg = target.cfg
    if recipe.eval_rows >= len(data):
        raise InvalidArgumentError(f"eval_rows {recipe.eval_rows} leaves no training rows of the {len(data)}")
    n_train = len(data) - recipe.eval_rows
    rows = data.read(np.arange(n_train), ["tokens", "loss_mask"])
    ranking = token_ranking(count_answer_tokens(rows["tokens"], rows["loss_mask"], cfg.vocab_size))
    vocab = reduced_vocab(target.params, cfg, ranking, recipe.draft_vocab) if recipe.draft_vocab else None
    parts = FAMILIES[recipe.recipe](recipe, data, n_train, target, vocab)
    final_drafter, weights = parts.drafter(parts.params, vocab)  # its settings refused now, not after training
    final_drafter.check(cfg, weights, None)
    result = train(recipe.train, parts.loss_fn, parts.params, parts.frozen, parts.batches, evaluate=parts.evaluate,
                   progress=progress)
    metrics = {"final_loss": float(result.loss) if result.loss is not None else None, "steps": int(result.step),
               **parts.evaluate(result.params, parts.frozen, result.step)}
    if recipe.tau_prompts:
        metrics.update(real_tau(*parts.drafter(result.params, vocab), target, data, n_train, recipe))
    meta = heads_meta(cfg, recipe=dataclasses.asdict(recipe) | {"train": dataclasses.asdict(recipe.train)},
                      data_manifest_sha256=hashlib.sha256((Path(recipe.data) / "manifest.json").read_bytes())
                      .hexdigest(), metrics=metrics)
    parts.save(recipe.out, result.params, meta, ranking)
    return metrics


def held_out_prompts(data, n_train: int, count: int) -> list[list[int]]:
    """The prompts (tokens before the answer) of the first `count` held-out rows, those after `n_train`."""
    rows = data.read(np.arange(n_train, min(n_train + count, len(data))), ["tokens", "loss_mask"])
    return [list(map(int, t[: int(np.argmax(m))])) for t, m in zip(rows["tokens"], rows["loss_mask"], strict=True)]


def real_tau(drafter, weights, target, data, n_train: int, recipe: Recipe) -> dict:
    """The trained drafter decoding held-out prompts through the engine: tau, and the output checked token for
    token against AR (greedy)."""
    from spec_jax.decoding import Engine, generate

    prompts = held_out_prompts(data, n_train, recipe.tau_prompts)
    cfg = target.cfg
    ar = generate(Engine(cfg), target.params, prompts, recipe.tau_tokens)
    gen = generate(Engine(cfg, drafter), target.params, prompts, recipe.tau_tokens, weights=weights)
    if gen.token_ids != ar.token_ids:
        raise AssertionError(f"{drafter.name} output differs from AR under greedy decoding: a losslessness bug")
    stats = gen.stats()
    return {"real_tau": round(float(stats["tau"]), 3), "tau_prompts": len(prompts),
            "tau_nodes": drafter.shape.nodes}


def summary_line(metrics: Mapping) -> str:
    lists = {k: v for k, v in metrics.items() if isinstance(v, list)}
    return json.dumps({k: v for k, v in metrics.items() if k not in lists}) + "".join(
        f" {k}={v}" for k, v in lists.items())
