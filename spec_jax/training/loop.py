"""The one training loop every recipe (Medusa, Hydra, EAGLE heads, draft models) runs.

    result = train(config, loss_fn, params, target, batches, evaluate=None, mesh=None)

- `loss_fn(params, target, batch, rng) -> (loss, aux)`: a scalar loss of the trainable `params`; `target`
  (the frozen model's parameters, or any pytree) is an input the gradient is not taken of; `rng` is a fresh
  key per step (feature noise, dropout); `aux` is a dict of scalars or small arrays (per-head losses and
  accuracies) logged with the loss. An aux entry `tokens` (the number of scored tokens) adds `tokens_per_s`.
- `batches(step, *, seed, batch_size)`: the batch for update `step` (0-based), a pytree of host arrays with
  leading dimension `batch_size`, the same shapes every step; a pure function of its arguments. That is the
  data position: a resumed run asks for the batches from its checkpoint's step on and needs no iterator state.
- `evaluate(params, target, step) -> dict` (optional): host numbers, logged every `eval_every` updates and at
  the end, under `"eval"`. It must be done with `params` when it returns (the next step reuses their memory).

Optimiser: AdamW with linear warm-up and cosine decay to 0 over `total_steps`, after global-norm clipping.
The update is one `jax.jit` function, compiled once, with explicit in/out shardings on the mesh (batch over
`data`, trainable state replicated, the target on its own shardings when it is already on the mesh) and the
trainable state donated, so each step updates it in place. With `fsdp` the trainable parameters and optimiser
state are instead split over `data` (`spec_jax.sharding.fsdp_sharding`), and XLA gathers them where the step
uses them: the same updates in less memory per device.

Exact resume: the train state is (step, params, opt_state, rng key). A checkpoint saves all of it (see
`checkpoints.py`); a run started with the same `output_dir` restores the latest and continues with batch
`step`, so a run killed at any point and restarted, as often as it takes, ends with the bit-identical
parameters of a run never stopped (`tests/test_training_loop.py` kills one with SIGKILL).

Metrics are fetched one step late (the host reads step s-1's loss while the device runs step s), except at
a checkpoint or evaluation, where the step about to be saved is read first: a non-finite loss or gradient
norm stops the run with `TrainingDivergedError` before anything computed from it is saved, so the latest
checkpoint always holds finite parameters. SIGINT/SIGTERM (as `spec_jax.interrupts.run_command` turns them
into exceptions) stop the loop; the save in flight, if any, is completed and nothing partial is left.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spec_jax.checks import output_dir as check_output_dir
from spec_jax.errors import CheckpointError, InvalidArgumentError, SpecJaxError
from spec_jax.sharding import DATA, batch_sharding, fsdp_sharding, make_mesh, parse_mesh, replicated, to_global
from spec_jax.training.checkpoints import Checkpoints
from spec_jax.training.config import TrainConfig
from spec_jax.training.logs import MetricsLog, plot_losses

RESERVED = ("step", "loss", "grad_norm", "lr", "finite", "seconds", "tokens_per_s", "eval")

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


class TrainingDivergedError(SpecJaxError):
    """The training loss or gradient became NaN or infinite; the run stopped before saving anything from it."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    params: Any  # the trainable parameters after `step` updates
    step: int
    loss: float | None  # the loss of the last update this process ran (None when it ran none)
    resumed_from: int | None  # the checkpoint step this run started from
    metrics_file: Path
    plot_file: Path | None  # None on processes other than 0


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate by update: linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 at
    `total_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps, config.total_steps)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on `lr_schedule` with decoupled weight decay."""
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(lr_schedule(config), weight_decay=config.weight_decay))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule):
    """The pure update: (state, target, batch) -> (state, metrics), state = {step, params, opt_state, rng}."""

    def train_step(state, target, batch):
        key, step_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], target, batch, step_key)
        clash = sorted(set(aux) & set(RESERVED))
        if clash:
            raise InvalidArgumentError(f"the loss function's aux uses the reserved metric names {clash}; rename them")
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        grad_norm = optax.tree.norm(grads)  # before clipping: what the guard and the log should see
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm), **aux}
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state, "rng": jax.random.key_data(key)}
        return new, metrics

    return train_step


def train(config: TrainConfig, loss_fn: LossFn, params, target, batches: Callable[..., Any], *,
          evaluate: Callable[[Any, Any, int], Mapping] | None = None, mesh=None, progress: bool = True) -> TrainResult:
    """Train `params` for `config.total_steps` updates (resuming from the latest checkpoint in
    `config.output_dir`); returns the final parameters, the last loss and where the metrics went. See the
    module doc for `loss_fn`, `batches` and `evaluate`. `mesh` overrides `config.mesh`. The caller's `params`
    are copied, never donated; on resume they only give the structure, shapes and dtypes restored into."""
    out_dir = check_output_dir(config.output_dir, "output_dir")
    mesh = mesh if mesh is not None else parse_mesh(config.mesh) or make_mesh(1, 1)
    if config.batch_size % mesh.shape[DATA]:
        raise InvalidArgumentError(f"batch_size {config.batch_size} does not split over the mesh's {mesh.shape[DATA]} "
                                   "data-parallel devices; make it a multiple")
    optimizer, schedule = make_optimizer(config), lr_schedule(config)
    shardings = _state_shardings(config, optimizer, params, mesh)
    ckpts = Checkpoints(out_dir, config.keep_checkpoints)
    failed = True
    try:
        state, start = _initial_state(ckpts, config, optimizer, params, shardings)
        run = _Run(config, ckpts, MetricsLog(out_dir / "metrics.jsonl", start, jax.process_index() == 0),
                   start, progress)
        try:
            if start < config.total_steps:
                target_shardings = jax.tree.map(lambda x: _target_sharding(x, mesh), target)
                target = _place(target, target_shardings)
                first = _host_batch(batches, start, config)
                step = jax.jit(make_train_step(loss_fn, optimizer, schedule),
                               in_shardings=(shardings, target_shardings,
                                             jax.tree.map(lambda x: batch_sharding(x, mesh), first)),
                               out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
                state = run.loop(step, state, target, batches, first, mesh, evaluate)
        except TrainingDivergedError:
            run.close()
            _plot(run.log.path, out_dir)  # the curve up to the divergence, to see how it came
            raise
        finally:
            run.close()
        plot = _plot(run.log.path, out_dir)
        failed = False
    finally:
        ckpts.close(finish=not failed)
    return TrainResult(params=state["params"], step=config.total_steps, loss=run.last_loss,
                       resumed_from=start or None, metrics_file=run.log.path, plot_file=plot)


def _plot(metrics_file: Path, out_dir: Path) -> Path | None:
    """The loss curve next to the metrics (process 0 only)."""
    return plot_losses(metrics_file, out_dir / "loss.png") if jax.process_index() == 0 else None


def _state_shardings(config: TrainConfig, optimizer, params, mesh) -> dict:
    """The train state's shardings on `mesh`: step and RNG key replicated; parameters and optimiser state
    replicated, or with `config.fsdp` each array split by `fsdp_sharding` (Adam's moments like their
    parameters, its step count replicated)."""
    rep = replicated(mesh)
    place = (lambda x: fsdp_sharding(x, mesh)) if config.fsdp else (lambda _: rep)
    return {"step": rep, "params": jax.tree.map(place, params),
            "opt_state": jax.tree.map(place, jax.eval_shape(optimizer.init, params)), "rng": rep}


def _initial_state(ckpts: Checkpoints, config: TrainConfig, optimizer, params, shardings):
    """(state, step): fresh from `params` and the seed, or restored from the latest checkpoint; on
    `shardings` (`_state_shardings`)."""
    params = _place(params, shardings["params"])
    # A copy (jit would hand an unchanged input back as the same buffer), so donating the state at the first
    # step leaves the caller's `params` alone.
    init = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": jax.tree.map(jnp.copy, p),
                              "opt_state": optimizer.init(p), "rng": jax.random.key_data(jax.random.key(config.seed))},
                   out_shardings=shardings)
    state = init(params)
    start = ckpts.latest_step()
    if start is None:
        return state, 0
    # Restored onto the fresh state's shardings, whichever the checkpoint was saved from (fsdp may differ).
    p, opt_state, meta = ckpts.restore(start, state["params"], state["opt_state"], None, config)
    if meta.get("data_position") != start or meta.get("step") != start:
        raise CheckpointError(f"checkpoint {start} in {ckpts.directory}: its meta says step {meta.get('step')} "
                                   f"and data position {meta.get('data_position')}; the checkpoint is corrupt")
    host = {"step": np.int32(start), "rng": np.asarray(meta["rng"], np.uint32)}
    return {"params": p, "opt_state": opt_state,
            **_place(host, {"step": shardings["step"], "rng": shardings["rng"]})}, start


class _Run:
    """The host side of the loop: metrics one step late, the NaN guard, checkpoints, evaluation, progress."""

    def __init__(self, config: TrainConfig, ckpts: Checkpoints, log: MetricsLog, start: int, progress: bool):
        from tqdm import tqdm

        self.config, self.ckpts, self.log, self.start = config, ckpts, log, start
        self.bar = tqdm(total=config.total_steps, initial=start, desc="train", unit="step", file=sys.stderr,
                        disable=not progress or jax.process_index() != 0, mininterval=1)
        self.last_loss: float | None = None
        self.t0 = self.t_last = time.perf_counter()

    def loop(self, step_fn, state, target, batches, first, mesh, evaluate):
        config, pending = self.config, None
        for s in range(self.start, config.total_steps):
            host = first if s == self.start else _host_batch(batches, s, config, like=first)
            batch = jax.tree.map(lambda x: to_global(x, batch_sharding(x, mesh)), host)
            state, metrics = step_fn(state, target, batch)
            if pending is not None:
                self.report(*pending)  # step s-1, read while the device runs step s
            pending = (s, metrics)
            done = s + 1
            save = done % config.checkpoint_every == 0 or done == config.total_steps
            score = evaluate is not None and (done == config.total_steps or
                                              (config.eval_every and done % config.eval_every == 0))
            if save or score:
                self.report(*pending)  # nothing computed from a non-finite step is saved or evaluated
                pending = None
                if score:
                    self.log.write({"step": done, "eval": dict(evaluate(state["params"], target, done))})
                if save:
                    self.ckpts.save(done, state["params"], state["opt_state"], _host(state["rng"]), config)
        if pending is not None:
            self.report(*pending)
        return state

    def report(self, s: int, metrics) -> None:
        """Log step `s`'s metrics (waiting for them), or stop the run if its loss or gradient is not finite."""
        m = _host(metrics)
        now = time.perf_counter()
        record = {"step": s, **{k: v for k, v in m.items() if k != "finite"}, "seconds": round(now - self.t0, 3)}
        if "tokens" in m:
            record["tokens_per_s"] = float(m["tokens"]) / max(now - self.t_last, 1e-9)
        self.t_last = now
        self.log.write(record)
        if not bool(m["finite"]):
            latest = self.ckpts.latest_step()
            kept = (f"the last good checkpoint is step {latest} in {self.ckpts.directory} (load_params reads it)"
                    if latest is not None else "no checkpoint was written before it")
            raise TrainingDivergedError(
                f"training diverged at step {s}: loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])}; "
                f"stopped before saving anything computed from it, and {kept}. Lower learning_rate, raise "
                f"warmup_steps or clip_norm, or check the data of step {s}, and train into a new output_dir")
        self.last_loss = float(m["loss"])
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.log.close()


def _host_batch(batches, step: int, config: TrainConfig, like=None):
    """`batches(step, ...)` as numpy arrays, checked: leading dimension `batch_size`, and the shapes of the first
    batch (`like`), since the step is compiled once for them."""
    batch = jax.tree.map(np.asarray, batches(step, seed=config.seed, batch_size=config.batch_size))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), batch)
    if like is None:
        bad = [a.shape for a in jax.tree.leaves(batch) if not a.shape or a.shape[0] != config.batch_size]
        if not jax.tree.leaves(batch) or bad:
            raise InvalidArgumentError(f"batches(step {step}) must return arrays of leading dimension batch_size "
                                       f"{config.batch_size}, got shapes {bad or 'no arrays'}")
    elif shapes != jax.tree.map(lambda x: (x.shape, x.dtype), like):
        raise InvalidArgumentError(f"batches(step {step}) returned {shapes}, unlike the first batch's "
                                   f"{jax.tree.map(lambda x: (x.shape, x.dtype), like)}; every batch must have the "
                                   "same shapes and dtypes (the step is compiled once)")
    return batch


def _host(tree):
    """Host copies of replicated arrays (every process holds a whole copy, also on a multi-host mesh)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _target_sharding(x, mesh):
    """The target keeps its sharding when it is already on `mesh` (a model loaded sharded); else replicated."""
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
        return s
    return replicated(mesh)


def _place(tree, shardings):
    """`tree`'s arrays on `shardings` (kept as they are when already there)."""
    def put(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, s)
        return to_global(np.asarray(x), s)

    return jax.tree.map(put, tree, shardings)

