"""Sharded training on 8 simulated CPU devices with `fsdp`: the heads and Adam's moments are split over `data`,
the run reaches the parameters of the one-device run within float tolerance (reductions are summed in another
order), and an FSDP run interrupted after a checkpoint resumes to the uninterrupted run's parameters, bit for
bit under FSDP and within tolerance on one device. Data and tensor parallel without FSDP:
`tests/test_training_loop.py`.

The runs share a persistent XLA compilation cache, so a step compiled once (the FSDP step, the one-device step)
is not compiled again by a later run or test: compiling, not training, is what these tests spend."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from spec_jax.drafters.medusa import init_heads, medusa_loss
from spec_jax.errors import InvalidArgumentError
from spec_jax.models import init_params
from spec_jax.sharding import DATA, MODEL, fsdp_sharding, make_mesh
from spec_jax.training import TrainConfig, read_records, train
from spec_jax.training.checkpoints import checkpoint_dir
from spec_jax.training.loop import make_optimizer
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
HEADS, SEQ = 4, 16  # kernel [4, 64, 64]: 2**14 elements, the smallest array FSDP splits; bias [4, 64] stays whole
TOTAL, EVERY = 6, 3
SPLIT = P(None, None, DATA)


def _batches(step, *, seed, batch_size):
    """Random hidden states and tokens, addressed by step."""
    rng = np.random.default_rng([seed, step])
    return {"hidden": rng.standard_normal((batch_size, SEQ, TINY.hidden_size), np.float32),
            "tokens": rng.integers(0, TINY.vocab_size, (batch_size, SEQ), np.int32)}


def _loss(heads, target, batch, rng):
    """Medusa's loss on the batch's hidden states with uniform noise from the step's key (so the RNG resumes too)."""
    hidden_BxTxE = batch["hidden"] + jax.random.uniform(rng, batch["hidden"].shape, minval=-1e-2, maxval=1e-2)
    loss, per_head_K = medusa_loss(heads, target, TINY, hidden_BxTxE, batch["tokens"], jnp.ones(batch["tokens"].shape))
    return loss, {"per_head": per_head_K}


def _run(out_dir: Path, target, stop_at: int | None = None, **kw):
    """A run of `TOTAL` steps into `out_dir`; with `stop_at`, interrupted (as by Ctrl-C) when it asks for that
    step's batch."""

    def batches(step, **kw):
        if step == stop_at:
            raise KeyboardInterrupt
        return _batches(step, **kw)

    config = TrainConfig(total_steps=TOTAL, output_dir=str(out_dir), learning_rate=1e-2, warmup_steps=1,
                         batch_size=8, checkpoint_every=EVERY, keep_checkpoints=1, seed=3, **kw)
    return train(config, _loss, init_heads(TINY, HEADS, jax.random.key(1), scale=0.02), target, batches,
                 progress=False)


def _losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_records(out_dir / "metrics.jsonl")]


def _close(a, b, what: str) -> None:
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-6, err_msg=f"{what}: {k}")


def _saved_specs(out_dir: Path, step: int) -> dict[str, tuple]:
    """The partition spec each array of checkpoint `step` was saved from (orbax's metadata), by its path."""
    manager = ocp.CheckpointManager(checkpoint_dir(out_dir), options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_handlers={item: ocp.StandardCheckpointHandler()
                                                   for item in ("params", "opt_state")})
    try:
        meta = manager.item_metadata(step)
        return {item + jax.tree_util.keystr(path): tuple(m.sharding.partition_spec)
                for item in ("params", "opt_state") for path, m in jax.tree_util.tree_leaves_with_path(meta[item])}
    finally:
        manager.close()


def fsdp_matches_one_device(out: Path) -> None:
    """Run on 8 devices by `test_fsdp_matches_one_device`."""
    assert jax.device_count() == 8, jax.devices()
    target = init_params(TINY, jax.random.key(0))
    one = _run(out / "one", target)
    fsdp = _run(out / "fsdp", target, mesh="data=8", fsdp=True)
    assert fsdp.params["kernel"].sharding.spec == SPLIT and fsdp.params["bias"].sharding.is_fully_replicated
    specs = _saved_specs(out / "fsdp", TOTAL)
    assert sorted(k for k, spec in specs.items() if spec) == [
        "opt_state[1][0]['mu']['kernel']", "opt_state[1][0]['nu']['kernel']", "params['kernel']"], specs
    assert specs["params['kernel']"] == tuple(SPLIT)
    _close(fsdp.params, one.params, "fsdp on 8 devices vs one device")
    np.testing.assert_allclose(_losses(out / "fsdp"), _losses(out / "one"), rtol=1e-5)


def fsdp_resumes(out: Path) -> None:
    """Run on 8 devices by `test_fsdp_run_resumes`."""
    assert jax.device_count() == 8, jax.devices()
    target = init_params(TINY, jax.random.key(0))
    whole = _run(out / "whole", target, mesh="data=8", fsdp=True)
    with pytest.raises(KeyboardInterrupt):
        _run(out / "cut", target, stop_at=EVERY + 1, mesh="data=8", fsdp=True)  # checkpoint 3, step 3 run past it
    shutil.copytree(out / "cut", out / "cut_one")
    resumed = _run(out / "cut", target, mesh="data=8", fsdp=True)
    assert resumed.resumed_from == EVERY and resumed.params["kernel"].sharding.spec == SPLIT
    for k in ("kernel", "bias"):  # the same program on the same restored state
        np.testing.assert_array_equal(np.asarray(resumed.params[k]), np.asarray(whole.params[k]), err_msg=k)
    assert _losses(out / "cut") == _losses(out / "whole")
    # The split checkpoint restored onto one device (orbax reshards to the fresh state's shardings).
    moved = _run(out / "cut_one", target)
    assert moved.resumed_from == EVERY and moved.params["kernel"].sharding.is_fully_replicated
    _close(moved.params, whole.params, "resumed on one device vs fsdp")


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")


def _on_8_devices(function: str, out_dir: Path, xla_cache: Path) -> None:
    """`function(out_dir)` of this module in a subprocess that sees 8 simulated CPU devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(xla_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    code = (f"import sys; from pathlib import Path; from tests.test_training_sharded import {function}; "
            f"{function}(Path(sys.argv[1])); print('OK')")
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_fsdp_sharding_picks_the_largest_divisible_dimension():
    assert fsdp_sharding(np.zeros((4, 64, 64)), make_mesh(1, 1)).is_fully_replicated  # one data device
    mesh = AbstractMesh((8, 1), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))
    specs = {shape: fsdp_sharding(jax.ShapeDtypeStruct(shape, np.float32), mesh).spec
             for shape in [(4, 64, 64), (4, 64), (), (3, 2**14), (2**14, 24), (9, 9, 999)]}
    assert specs == {(4, 64, 64): SPLIT, (4, 64): P(),  # too small to be worth splitting
                     (): P(), (3, 2**14): P(None, DATA), (2**14, 24): P(DATA, None),
                     (9, 9, 999): P()}  # no dimension divisible by 8
    # Adam's moments follow their parameters; its scalar step count stays whole.
    config = TrainConfig(total_steps=TOTAL, output_dir="unused")
    opt = jax.eval_shape(make_optimizer(config).init, {"kernel": np.zeros((4, 64, 64), np.float32)})
    assert sorted({str(fsdp_sharding(x, mesh).spec) for x in jax.tree.leaves(opt)}) == [str(P()), str(SPLIT)]


def test_fsdp_matches_one_device(tmp_path, xla_cache):
    _on_8_devices("fsdp_matches_one_device", tmp_path, xla_cache)


def test_fsdp_run_resumes(tmp_path, xla_cache):
    _on_8_devices("fsdp_resumes", tmp_path, xla_cache)


def test_fsdp_config_key(tmp_path):
    config = TrainConfig.from_mapping({"total_steps": 2, "output_dir": str(tmp_path), "fsdp": True})
    assert config.fsdp and not TrainConfig(total_steps=2, output_dir=str(tmp_path)).fsdp
    with pytest.raises(InvalidArgumentError, match="fsdp must be true or false, got 'yes'"):
        TrainConfig.from_mapping({"total_steps": 2, "output_dir": str(tmp_path), "fsdp": "yes"})
