"""A learned draft-structure predictor for dynamic trees: AdaEAGLE's Lightweight Draft Length Predictor
(Zhang et al. 2024, "AdaEAGLE: Optimizing Speculative Decoding via Explicit Modeling of Adaptive Draft
Structures"), usable with `eagle` and `draft_tree` (`--structure-head`).

Before drafting, a small MLP reads the draft's features at the root and predicts how many draft tokens the
target will accept from there; the tree is then grown only that deep (`draft_dynamic_tree`'s depth limit),
so a step the predictor expects to fail early drafts fewer levels. AdaEAGLE's rule is
k = min(k_max, max(0, Round(MLP(e, f)))); a tree drafts at least one level, and `margin` levels past the
predicted count let siblings extend a run the top-1 chain would have lost:

    depth = clip(round(pred) + margin, 1, tree depth)

Inputs (`structure_inputs`), RMS-normalised each: the embedding e of the root's token and a feature f of the
draft's state at the root (LDLP reads e and the target's last hidden state), plus the draft's confidence
there: its top-1 probability and normalised entropy at the root.

- `eagle`: e = the target's embedding of the pending token, f = the feature EAGLE's draft row pairs it with
  (the target's final-normed last hidden state of the last committed token, or EAGLE-3's fusion).
- `draft_tree`: e = the draft model's embedding of the pending token, f = its last hidden state there.

Training (`spec_jax.training.structure_recipe`): regression (mean squared error) onto the number of draft
tokens a greedy chain gets accepted from that position, capped at `max_depth`. On the self-distillation data,
which the target generated greedily, the teacher-forced run of draft == target agreements is exactly that.
The predictor only chooses how deep to draft; verification is unchanged, so decoding stays lossless.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters import head_checkpoints as hc
from spec_jax.drafters.registry import Option
from spec_jax.errors import CheckpointError, DataFormatError, InvalidArgumentError
from spec_jax.models import Config

HEAD_TYPE = "structure"
DRAFTERS = ("eagle", "draft_tree")  # the methods a predictor can be trained for
CONFIDENCE = 2  # inputs past the two feature vectors: top-1 probability and normalised entropy at the root
OFF = "none"  # --structure-head none: no predictor, even where one ships


@dataclasses.dataclass(frozen=True)
class Structure:
    """A drafter's static predictor settings: `margin` levels drafted past the predicted accepted count."""

    margin: int = 1

    def __post_init__(self):
        if self.margin < 0:
            raise InvalidArgumentError(f"--structure-margin must be >= 0, got {self.margin}")


# ----------------------------------------------------------------------------- the predictor (pure functions)

def input_size(embed_dim: int, feature_dim: int) -> int:
    """Width of `structure_inputs`' rows."""
    return embed_dim + feature_dim + CONFIDENCE


def _rms(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def structure_inputs(token_emb_BxE, feature_BxF, root_logits_BxV) -> jax.Array:
    """The predictor's input rows [B, E + F + 2]: RMS-normalised token embedding and feature, then the draft's
    top-1 probability and entropy / log V at the root."""
    logp_BxV = jax.nn.log_softmax(root_logits_BxV.astype(jnp.float32), axis=-1)
    p_BxV = jnp.exp(logp_BxV)
    top1_B = jnp.max(p_BxV, axis=-1)
    entropy_B = -jnp.sum(p_BxV * logp_BxV, axis=-1) / math.log(root_logits_BxV.shape[-1])
    return jnp.concatenate([_rms(token_emb_BxE), _rms(feature_BxF), top1_B[..., None], entropy_B[..., None]], -1)


def init_structure(inputs: int, hidden: int, rng: jax.Array) -> dict:
    """Predictor parameters (float32): `fc1` [I, H] + bias, SiLU, `fc2` [H, 1] + bias."""
    k1, k2 = jax.random.split(rng)
    return {"fc1": {"kernel": jax.random.normal(k1, (inputs, hidden), jnp.float32) / math.sqrt(inputs),
                    "bias": jnp.zeros((hidden,), jnp.float32)},
            "fc2": {"kernel": jax.random.normal(k2, (hidden, 1), jnp.float32) / math.sqrt(hidden),
                    "bias": jnp.zeros((1,), jnp.float32)}}


def predict_accepted(params, x_BxI) -> jax.Array:
    """The predicted number of accepted draft tokens [B] (a real number; LDLP's MLP output)."""
    h = jax.nn.silu(x_BxI @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    return (h @ params["fc2"]["kernel"] + params["fc2"]["bias"])[..., 0]


def depth_limit(pred_B, margin: int, depth: int) -> jax.Array:
    """Per-sequence tree depth [B] int32: AdaEAGLE's Round(pred), plus `margin`, within 1..`depth`."""
    return jnp.clip(jnp.round(pred_B).astype(jnp.int32) + margin, 1, depth)


def structure_loss(params, batch: Mapping):
    """(loss, aux): mean squared error of the predicted accepted count against `batch["labels"]` [B] over the
    rows `batch["inputs"]` [B, I]; aux: mean absolute error and the rounded prediction's exact-hit rate."""
    pred_B = predict_accepted(params, batch["inputs"])
    err_B = pred_B - batch["labels"].astype(jnp.float32)
    aux = {"mae": jnp.mean(jnp.abs(err_B)),
           "exact": jnp.mean((jnp.round(pred_B) == batch["labels"]).astype(jnp.float32))}
    return jnp.mean(err_B * err_B), aux


def chain_labels(hits_NxD: np.ndarray, valid_NxD: np.ndarray) -> np.ndarray:
    """Accepted count of a greedy chain [N]: the run of hits from its first step, counting valid steps only."""
    return np.cumprod(hits_NxD & valid_NxD, axis=1).sum(axis=1).astype(np.float32)


def held_out_metrics(pred_N: np.ndarray, labels_N: np.ndarray, depth: int, margin: int) -> dict:
    """How the predictor does on held-out rows: MAE, exact hits of the rounded count, the mean depth it drafts
    to (tree depth `depth`, `margin`), and the chain's accepted count with that depth against the full depth
    (`sim_accept` vs `sim_accept_full`: what the cut costs a chain) and how often the cut loses tokens."""
    d_N = np.clip(np.round(pred_N).astype(np.int64) + margin, 1, depth)
    full_N = np.minimum(labels_N, depth)
    return {"mae": round(float(np.mean(np.abs(pred_N - labels_N))), 4),
            "exact": round(float(np.mean(np.round(pred_N) == labels_N)), 4),
            "label_mean": round(float(np.mean(labels_N)), 4),
            "mean_depth": round(float(np.mean(d_N)), 4), "full_depth": depth,
            "sim_accept": round(float(np.mean(np.minimum(full_N, d_N))), 4),
            "sim_accept_full": round(float(np.mean(full_N)), 4),
            "cut_rate": round(float(np.mean(d_N < full_N)), 4), "rows": int(len(labels_N))}


# ----------------------------------------------------------------------------- which drafter it is for

def drafter_fingerprint(weights: Mapping) -> str:
    """What a predictor records of the drafter it was trained on (`head_checkpoints.weights_fingerprint`; the
    reduced vocabulary and any predictor left out), so that one trained for another draft is refused."""
    return hc.weights_fingerprint({k: v for k, v in weights.items() if k not in ("vocab", HEAD_TYPE)})


# ----------------------------------------------------------------------------- checkpoints

REQUIRED = {"drafter": str, "drafter_sha256": str, "max_depth": int, "inputs": int, "hidden": int}


def _shapes(config: Mapping) -> dict:
    n_in, hidden = config["inputs"], config["hidden"]
    return {"fc1.kernel": (n_in, hidden), "fc1.bias": (hidden,), "fc2.kernel": (hidden, 1), "fc2.bias": (1,)}


def save_structure(path: str | os.PathLike, params, meta: Mapping, drafter: str, fingerprint: str,
                   max_depth: int) -> Path:
    """Write a predictor (float16) for the `drafter` method's draft of fingerprint `fingerprint`; `meta` from
    `heads_meta(cfg, ...)`."""
    if drafter not in DRAFTERS:
        raise InvalidArgumentError(f"a structure predictor is for one of {', '.join(DRAFTERS)}, got {drafter!r}")
    n_in, hidden = (int(s) for s in np.shape(params["fc1"]["kernel"]))
    extra = {"drafter": drafter, "drafter_sha256": fingerprint, "max_depth": int(max_depth), "inputs": n_in,
             "hidden": hidden}
    return hc.save_heads(path, HEAD_TYPE, params, {**meta, **extra}, dtype=np.float16)


def read_structure_config(path: str | os.PathLike, cfg: Config, drafter: str) -> dict:
    """A predictor directory's config, refused unless it is for method `drafter` on this model. Reads no
    weights."""
    config = hc.read_heads_config(path, cfg, HEAD_TYPE, REQUIRED)
    if config["drafter"] != drafter:
        raise InvalidArgumentError(f"--structure-head {path}: this predictor was trained for --method "
                                   f"{config['drafter']}, not {drafter}; train one for {drafter} (recipe: structure)")
    if config["max_depth"] < 1 or config["inputs"] <= CONFIDENCE or config["hidden"] < 1:
        raise DataFormatError(f"{Path(path) / hc.CONFIG_FILE}: max_depth, inputs and hidden must be positive "
                              f"(inputs > {CONFIDENCE}), got {config['max_depth']}, {config['inputs']}, "
                              f"{config['hidden']}")
    return config


def load_structure(path: str | os.PathLike, cfg: Config, drafter: str, fingerprint: str | None = None, *,
                   mesh=None) -> tuple[dict, dict]:
    """(params, config) of a predictor for `drafter`; with `fingerprint`, refused unless it was trained on
    exactly that draft (`drafter_fingerprint`)."""
    config = read_structure_config(path, cfg, drafter)
    if fingerprint is not None and config["drafter_sha256"] != fingerprint:
        raise InvalidArgumentError(f"--structure-head {path}: this predictor was trained on another {drafter} "
                                   "draft than the one in use (its drafter_sha256 differs); train one for this "
                                   "draft (recipe: structure) or drop --structure-head")
    return hc.load_heads(path, cfg, HEAD_TYPE, _shapes, required=REQUIRED, mesh=mesh)


def check_weights(structure: Structure | None, params, inputs: int, method: str) -> None:
    """A drafter's predictor settings and weights agree: both or neither, and the input width fits the draft."""
    if structure is None:
        return
    if not isinstance(params, Mapping) or "fc1" not in params:
        raise TypeError(f"{method}: a structure predictor needs its weights under weights['structure']")
    got = tuple(np.shape(params["fc1"]["kernel"]))[0]
    if got != inputs:
        raise InvalidArgumentError(f"{method}: the structure predictor reads {got} inputs, this draft gives {inputs}")


# ----------------------------------------------------------------------------- options

STRUCTURE_OPTIONS = (
    Option("structure_head", str, None, "a draft-structure predictor (AdaEAGLE) that sets each step's tree depth: "
           f"a directory from the structure recipe; {OFF}: no predictor; default: the one shipped for this "
           "draft when it fits"),
    Option("structure_margin", int, 1, "tree levels drafted past the predictor's accepted count", min=0),
)


def check_option(opts, cfg: Config, drafter: str) -> None:
    """--structure-head is a predictor directory for this model and method (config only; the draft it was
    trained on is checked once the draft's weights are loaded)."""
    if opts.structure_head in (None, OFF):
        return
    path = hc.given_dir(opts.structure_head, "--structure-head",
                        f"a predictor directory ({hc.CONFIG_FILE} + {hc.WEIGHTS_FILE}) or {OFF}")
    read_structure_config(path, cfg, drafter)


def shipped_structure(cfg: Config, drafter: str, fingerprint: str) -> Path | None:
    """The predictor shipped with spec-jax for this model, method and draft, if any."""
    for path in sorted(hc.SHIPPED.glob(f"{HEAD_TYPE}_*")):
        try:
            config = read_structure_config(path, cfg, drafter)
        except (InvalidArgumentError, DataFormatError, CheckpointError):
            continue
        if config["drafter_sha256"] == fingerprint:
            return path
    return None


def with_structure(opts, target, drafter: str, weights: Mapping) -> tuple[Structure | None, Mapping]:
    """(settings, weights with the predictor under 'structure'): `--structure-head`, checked against the draft
    in `weights`; by default the shipped predictor when it was trained on this draft; else (None, weights)."""
    if opts.structure_head == OFF:
        return None, weights
    fingerprint = drafter_fingerprint(weights)
    path = (shipped_structure(target.cfg, drafter, fingerprint) if opts.structure_head is None
            else Path(opts.structure_head))
    if path is None:
        return None, weights
    params, _ = load_structure(path, target.cfg, drafter, fingerprint, mesh=target.mesh)
    return Structure(margin=opts.structure_margin), {**weights, HEAD_TYPE: params}
