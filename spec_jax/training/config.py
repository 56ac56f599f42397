"""`TrainConfig`: the settings of one training run, shared by every recipe, and how a YAML mapping becomes one.

Every field is checked where it is set (directly or from YAML) with the same `Range` types as the command
line, so a bad value is one line naming the key before anything is compiled. A key the config does not know
is refused by name: a misspelt `learning_rte` must not silently train at the default rate.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path

from spec_jax.checks import Range, read_yaml
from spec_jax.errors import InvalidArgumentError

# The fields a resumed run must share with the run that wrote its checkpoints: each changes the update at some
# step (the schedule, the data, the clipping), so resuming under another value could not be exact.
RUN_DEFINING = ("learning_rate", "warmup_steps", "total_steps", "weight_decay", "clip_norm", "batch_size", "seed")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: optimiser (AdamW, linear warm-up then cosine decay to 0, global-norm clipping), data
    (batch size, seed), checkpoints and evaluation cadence, where outputs go, and the device mesh.

    `output_dir` holds `checkpoints/<step>/` (orbax), `metrics.jsonl` and `loss.png`; a run started again with
    the same `output_dir` resumes from its latest checkpoint. `mesh` is `None` (one device), `auto` or
    `data=D,model=M` as `--mesh` takes it (`spec_jax.sharding.parse_mesh`). `fsdp` splits the trainable
    parameters and the optimiser state over the mesh's `data` axis (`spec_jax.sharding.fsdp_sharding`) instead
    of replicating them: less memory per device, the same updates, so a run may resume under the other value.
    `eval_every` 0 evaluates only at the end.
    """

    total_steps: int
    output_dir: str
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    batch_size: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 0
    seed: int = 0
    mesh: str | None = None
    fsdp: bool = False

    def __post_init__(self):
        for name, value in _checked(dataclasses.asdict(self), "training config").items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, data: Mapping, source: str = "training config") -> TrainConfig:
        """A config from a mapping (a parsed YAML file, keys `-` or `_`), refusing unknown and missing keys by
        name; `source` (the file) starts every error."""
        return cls(**_checked(fields_from_mapping(cls, data, source, "training", nullable=("mesh",)), source))

    def to_dict(self) -> dict:
        """The fields as plain values (stored with every checkpoint)."""
        return dataclasses.asdict(self)


CHECKS = {
    "total_steps": Range(int, 1),
    "learning_rate": Range(float, 0, min_open=True),
    "warmup_steps": Range(int, 0),
    "weight_decay": Range(float, 0),
    "clip_norm": Range(float, 0, min_open=True),
    "batch_size": Range(int, 1),
    "checkpoint_every": Range(int, 1),
    "keep_checkpoints": Range(int, 1),
    "eval_every": Range(int, 0),
    "seed": Range(int, 0),
}


def fields_from_mapping(cls, data, source: str, what: str, nullable: tuple[str, ...] = ()) -> dict:
    """The values of dataclass `cls`'s fields from a mapping (a parsed YAML file; keys with `-` or `_`),
    refusing a non-mapping, unknown keys, keys without a value (but `nullable` ones) and missing required
    fields, each by name; `source` (the file) starts every error, `what` names the kind of keys."""
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(f"{source}: expected a mapping of key: value, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise InvalidArgumentError(f"{source}: unknown key {key!r}; the {what} keys are {', '.join(names)}")
        if value is None and name not in nullable:
            raise InvalidArgumentError(f"{source}: {key} has no value; give one or delete the line")
        values[name] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise InvalidArgumentError(f"{source}: missing {', '.join(missing)} (required)")
    return values


def check_ranges(values: dict, checks: Mapping, source: str) -> dict:
    """`values` with each key of `checks` present converted and range-checked by its `Range`; errors name
    `source` and the key."""
    out = dict(values)
    for name, check in checks.items():
        if name in out:
            try:
                out[name] = check(out[name])
            except argparse.ArgumentTypeError as e:
                raise InvalidArgumentError(f"{source}: {name}: {e}") from None
    return out


def _checked(values: dict, source: str) -> dict:
    """`values` converted and range-checked field by field (`CHECKS`), then across fields; errors name `source`
    and the key."""
    out = check_ranges(values, CHECKS, source)
    if "warmup_steps" in out and "total_steps" in out and out["warmup_steps"] >= out["total_steps"]:
        raise InvalidArgumentError(f"{source}: warmup_steps ({out['warmup_steps']}) must be below total_steps "
                                   f"({out['total_steps']}): the cosine decay needs steps after it")
    if "output_dir" in out:
        if not isinstance(out["output_dir"], str | Path) or not str(out["output_dir"]):
            raise InvalidArgumentError(f"{source}: output_dir must be a folder name, got {out['output_dir']!r}")
        out["output_dir"] = str(out["output_dir"])
    if "fsdp" in out and not isinstance(out["fsdp"], bool):
        raise InvalidArgumentError(f"{source}: fsdp must be true or false, got {out['fsdp']!r}")
    if out.get("mesh") is not None and not isinstance(out["mesh"], str):
        raise InvalidArgumentError(f"{source}: mesh must be 'auto' or 'data=D,model=M', got {out['mesh']!r}")
    return out


def load_train_config(path: str, section: str | None = None) -> TrainConfig:
    """A `TrainConfig` from a YAML file: the whole file, or its mapping under `section` (a recipe's file keeps
    the training keys under, say, `train:` next to its own)."""
    data = read_yaml(path, "training config")
    if section is not None:
        if not isinstance(data, Mapping) or section not in data:
            raise InvalidArgumentError(f"config file {path}: no {section!r} section")
        data = data[section]
    return TrainConfig.from_mapping(data, source=f"config file {path}" + (f" ({section})" if section else ""))
