"""Trained draft heads on disk, for every head family (Medusa, Hydra, EAGLE): one directory each.

    <dir>/config.json         head_type, the target model's hidden_size / vocab_size / num_layers, the
                              family's own settings (number of heads, layers read, ...) and free metadata
                              (recipe, data manifest hash, metrics)
    <dir>/heads.safetensors   the parameters (float32, or float16 to halve a checkpoint), nested names joined
                              with "." ("fc.kernel")
    <dir>/token_ranking.npy   (optional) token ids by frequency in the training data (`vocab.py`)

`save_heads` writes the directory atomically; `read_heads_config` checks the config against the model and
the head type before any weights are read (what a method's registry `check` calls); `load_heads` checks the
tensors against the shapes the family expects from that config, so a truncated or mismatched file is one
clear error, never a shape error deep inside a jitted step.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from spec_jax.errors import CheckpointError, DataFormatError, InvalidArgumentError
from spec_jax.files import _as_if_created, atomic_path
from spec_jax.models import Config
from spec_jax.sharding import replicated, to_global

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "heads.safetensors"
RANKING_FILE = "token_ranking.npy"
MODEL_FIELDS = ("hidden_size", "vocab_size", "num_layers")  # what a checkpoint must share with the target
# The trained families, each used by the method of that name (a draft-structure predictor by eagle / draft_tree).
HEAD_TYPES = ("medusa", "hydra", "eagle", "draft", "early_exit", "specdecpp", "structure")
SHIPPED = Path(__file__).resolve().parents[1] / "heads"  # spec_jax/heads/<type>_<model>/: shipped with spec-jax


def heads_meta(cfg: Config, **extra) -> dict:
    """The model fields `save_heads` needs for heads trained on model `cfg`, with any extra fields."""
    return {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers, **extra}


def flat_names(tree: Mapping, prefix: str = "") -> dict:
    """{"fc": {"kernel": leaf}} -> {"fc.kernel": leaf}: the tensor names of a checkpoint, leaves as they are."""
    out = {}
    for k, v in tree.items():
        out.update(flat_names(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def flatten(tree: Mapping, dtype=np.float32) -> dict[str, np.ndarray]:
    """`flat_names` with the leaves as host arrays of `dtype`."""
    return {k: np.asarray(jax.device_get(v)).astype(dtype) for k, v in flat_names(tree).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        *path, leaf = name.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def save_heads(path: str | os.PathLike, head_type: str, params: Mapping, meta: Mapping,
               ranking_V: np.ndarray | None = None, dtype=np.float32) -> Path:
    """Write heads of `head_type` to directory `path` (atomically): config.json (`meta`, which must hold the
    target's MODEL_FIELDS: `heads_meta(cfg, ...)`, plus the head type) and the parameters as `dtype` (float16
    halves a checkpoint; they load as float32 either way); with `ranking_V`, the token ranking for
    `--draft-vocab`."""
    from safetensors.numpy import save_file

    missing = [f for f in MODEL_FIELDS if f not in meta]
    if missing:
        raise InvalidArgumentError(f"save_heads: meta lacks {', '.join(missing)} of the target model "
                                   "(build it with heads_meta(cfg))")
    config = {**meta, "head_type": head_type}
    with atomic_path(path, directory=True) as tmp:
        save_file(flatten(params, dtype=dtype), str(tmp / WEIGHTS_FILE))
        _as_if_created(tmp / WEIGHTS_FILE, directory=False)  # safetensors writes owner-only files
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if ranking_V is not None:
            np.save(tmp / RANKING_FILE, np.asarray(ranking_V, np.int32))
    return Path(path)


def read_heads_config(path: str | os.PathLike, cfg: Config, head_type: str,
                      required: Mapping[str, type] | None = None) -> dict:
    """A heads directory's config, refused unless it holds `head_type` heads for this model (hidden size,
    vocabulary and layer count), has its weights file, and has each `required` field with its type. Reads
    no weights."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path}: not a draft-heads directory (expected {CONFIG_FILE} and {WEIGHTS_FILE}, "
                              "as written by save_heads)")
    try:
        config = json.loads(file.read_bytes())
        found = config["head_type"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataFormatError(f"{file}: not a draft-heads config ({e!r}); expected a JSON object with head_type "
                              f"and {', '.join(MODEL_FIELDS)}") from None
    if found != head_type:
        use = {"draft": "--method draft --draft-model DIR", "structure": "--structure-head DIR (eagle, draft_tree)",
               "specdecpp": "--method specdecpp --acceptance-head DIR"}.get(found, f"--method {found}")
        hint = (f"; use {use} for them" if found in HEAD_TYPES else
                f" (not a head type spec-jax knows: {', '.join(HEAD_TYPES)})")
        raise DataFormatError(f"{file}: head_type is {found!r}, this method needs {head_type!r} heads{hint}")
    for field in MODEL_FIELDS:
        if config.get(field) != getattr(cfg, field):
            raise DataFormatError(f"{file}: heads trained for a model with {field} {config.get(field)}, this model "
                                  f"has {getattr(cfg, field)}; use heads trained for this model")
    for field, kind in (required or {}).items():
        value = config.get(field)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok or (kind is int and value < 0):
            want = "non-negative integer" if kind is int else kind.__name__
            raise DataFormatError(f"{file}: {field} must be a {want}, got {value!r}")
    return config


def load_heads(path: str | os.PathLike, cfg: Config, head_type: str,
               shapes: Callable[[dict], Mapping[str, tuple[int, ...]]], *,
               required: Mapping[str, type] | None = None, mesh=None) -> tuple[dict, dict]:
    """(params, config) of heads saved by `save_heads`: the config checked as `read_heads_config` does, the
    tensors against `shapes(config)` (flat names -> shapes); float32, replicated on `mesh` when given."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config = read_heads_config(path, cfg, head_type, required)
    file = Path(path) / WEIGHTS_FILE
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file is truncated or corrupt") from e
    want = dict(shapes(config))
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise DataFormatError(f"{file}: its tensors do not match what its {CONFIG_FILE} declares "
                              f"({', '.join(f'{k} {s}' for k, s in diff[:4])}); the checkpoint is damaged or "
                              "was not written by save_heads")
    params = unflatten({k: tensors[k].astype(np.float32) for k in want})
    return place(params, mesh), config


def place(params, mesh=None):
    """Parameters as device arrays: replicated on `mesh` (heads are small next to the target), else on the
    default device."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, params)
    return jax.tree.map(lambda x: to_global(np.asarray(x), replicated(mesh)), params)


def shipped_heads(cfg: Config, head_type: str) -> Path | None:
    """The `head_type` heads shipped with spec-jax for a model of this shape (the embedded SmolLM2-135M)."""
    for path in sorted(SHIPPED.glob(f"{head_type}_*")):
        try:
            read_heads_config(path, cfg, head_type)
        except (CheckpointError, DataFormatError):
            continue
        return path
    return None


def given_dir(value: str | None, flag: str, what: str) -> Path | None:
    """A directory option's value as a path (None when not given), refused with one clear error unless it
    is a directory; `what` says what to give instead."""
    if value is None:
        return None
    path = Path(value)
    if not path.is_dir():
        raise InvalidArgumentError(f"{flag} {value}: {'not a' if path.exists() else 'no such'} directory; "
                                   f"give {what}")
    return path


def heads_path(opts, cfg: Config, head_type: str, flag: str = "--heads") -> Path | None:
    """`--heads` checked to be a directory (one clear error otherwise), else the shipped heads, else None."""
    path = given_dir(opts.heads, flag, f"a directory of trained heads ({CONFIG_FILE} + {WEIGHTS_FILE})")
    return path if path is not None else shipped_heads(cfg, head_type)


def weights_fingerprint(weights: Mapping, sample: int = 4096) -> str:
    """sha256 identifying trained weights: each tensor's name, shape and an evenly strided sample of at most
    `sample` of its values, rounded to bfloat16 so that float32 and bfloat16 loads of one checkpoint agree.
    What a checkpoint trained on another drafter's outputs records, so that it is refused for a different one."""
    h = hashlib.sha256()
    for name, x in sorted(flat_names(weights).items()):
        flat = jax.numpy.ravel(x)
        values = np.asarray(jax.device_get(flat[::max(1, flat.shape[0] // sample)][:sample]))
        h.update(f"{name}:{tuple(np.shape(x))}:".encode())
        h.update(values.astype(np.float32).astype(ml_dtypes.bfloat16).tobytes())
    return h.hexdigest()
