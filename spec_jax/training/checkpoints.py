"""Training checkpoints: orbax's `CheckpointManager` over `<output_dir>/checkpoints/<step>/`.

A checkpoint at step `c` holds what a run needs to continue exactly as if it had never stopped: the trainable
parameters and the optimiser state after `c` updates (`params`, `opt_state`: arrays, bit for bit), and `meta`
(JSON): the step, the data position (the index of the next batch, which is `c`: batches are addressed by
step, so no iterator state is needed), the RNG key the next step splits, and the run's `TrainConfig`.

Orbax writes each checkpoint into a temporary sibling (`<step>.orbax-checkpoint-tmp-*`) and renames it when
complete, so a process killed mid-save leaves the previous checkpoints whole and only a temporary folder,
which the next run removes (`cleanup_tmp_directories`) and `close` removes on a clean stop. Saves are
asynchronous: `save` returns once the arrays are copied to host memory, and the files are written in a
background thread while training goes on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from spec_jax.errors import CheckpointError, InvalidArgumentError
from spec_jax.training.config import RUN_DEFINING, TrainConfig

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a checkpoint folder not yet renamed into place


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(output_dir).absolute() / "checkpoints"


def abstract(tree, sharding=None):
    """`tree`'s arrays as `jax.ShapeDtypeStruct`s with one `sharding`, or (None) each with its own: what orbax
    restores into."""
    def struct(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=x.sharding if sharding is None else sharding)

    return jax.tree.map(struct, tree)


class Checkpoints:
    """The checkpoints of one run: save every step asked for, keep the latest `keep`, restore the latest."""

    def __init__(self, output_dir: str | Path, keep: int, *, read_only: bool = False):
        self.directory = checkpoint_dir(output_dir)
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no checkpoints (not a training output_dir, or no checkpoint "
                                  "was written yet)")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=True, read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, rng_key_data, config: TrainConfig) -> None:
        """Start writing checkpoint `step` (returns once the arrays are on the host; see the module doc)."""
        meta = {"step": step, "data_position": step, "rng": np.asarray(rng_key_data).astype(int).tolist(),
                "config": config.to_dict()}
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                        opt_state=ocp.args.StandardSave(opt_state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, params_like, opt_state_like, sharding, config: TrainConfig | None = None):
        """(params, opt_state, meta) of checkpoint `step`, placed with `sharding`, or (None) each array on the
        sharding of its counterpart in `params_like` / `opt_state_like` (whatever the sharding it was saved
        from); refused when the arrays do not match those, or when `config` differs from the saved run in a field
        that changes the updates (`RUN_DEFINING`)."""
        where = f"checkpoint {step} in {self.directory}"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for a damaged folder
            raise CheckpointError(f"{where}: cannot read its meta ({type(e).__name__}: {e})") from e
        if config is not None:
            saved = meta.get("config", {})
            for field in RUN_DEFINING:
                if saved.get(field) != getattr(config, field):
                    raise InvalidArgumentError(
                        f"{where} was written by a run with {field} {saved.get(field)!r}, this run has "
                        f"{getattr(config, field)!r}: resuming would not continue that run exactly; use the same "
                        f"settings, or another output_dir for a new run")
        items = {"params": ocp.args.StandardRestore(abstract(params_like, sharding))}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract(opt_state_like, sharding))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(f"{where} does not match these parameters or this optimiser "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:500]}); was it written for "
                                  "another model or recipe?") from e
        return restored["params"], restored["opt_state"] if opt_state_like is not None else None, meta

    def close(self, finish: bool = True) -> None:
        """Wait for a save in flight (`finish`; after a failure, errors of that save are dropped), release the
        manager, and remove temporary folders of saves that never completed."""
        try:
            self.manager.wait_until_finished()
        except Exception:
            if finish:
                raise
        finally:
            self.manager.close()
            if jax.process_index() == 0 and self.directory.is_dir():
                for entry in self.directory.iterdir():
                    if TMP_MARK in entry.name:
                        shutil.rmtree(entry, ignore_errors=True)


def load_params(output_dir: str | Path, params_like, step: int | None = None, *, sharding=None):
    """(params, step): the trainable parameters of checkpoint `step` (default: the latest) of a training run,
    shaped like `params_like` and placed with `sharding` (default: the first device)."""
    ckpts = Checkpoints(output_dir, keep=1, read_only=True)
    try:
        step = ckpts.latest_step() if step is None else step
        if step is None or step not in ckpts.manager.all_steps():
            raise CheckpointError(f"{ckpts.directory}: no checkpoint {'' if step is None else step} "
                                  f"(steps there: {list(ckpts.manager.all_steps()) or 'none'})")
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params, _, _ = ckpts.restore(step, params_like, None, sharding)
        return params, step
    finally:
        ckpts.manager.close()
