"""The generic training loop: Medusa heads learn on a tiny frozen target (jitted once, logged, plotted,
checkpointed); a run killed with SIGKILL and restarted ends bit-identical to one never stopped (parameters,
losses, the metrics log), with a half-written checkpoint left behind ignored; SIGTERM stops cleanly with the
latest checkpoint whole; a diverging loss stops the run before anything computed from it is saved; configs
refuse unknown keys and bad values, and a resume under other settings is refused."""

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_jax.drafters.medusa import init_heads, medusa_loss
from spec_jax.errors import InvalidArgumentError
from spec_jax.interrupts import run_command
from spec_jax.models import forward, init_cache, init_params
from spec_jax.training import (
    TrainConfig,
    TrainingDivergedError,
    load_params,
    load_train_config,
    read_records,
    train,
)
from spec_jax.training.checkpoints import TMP_MARK, checkpoint_dir
from tests.conftest import TINY

HEADS, SEQ = 3, 24
ROOT = Path(__file__).resolve().parent.parent


def chain_batches(vocab: int, poison_from: int | None = None, wait_at: int | None = None):
    """Batches addressed by step: token sequences that follow one fixed random permutation of the vocabulary
    from a random first token (so the token 2+k ahead is a function of the current one: learnable by the
    heads); "poison" is NaN from step `poison_from` on; from step `wait_at` on the function announces itself
    on stderr and blocks (a run to be killed there)."""
    perm = np.random.default_rng(1234).permutation(vocab).astype(np.int32)

    def batches(step, *, seed, batch_size):
        if wait_at is not None and step >= wait_at:
            print(f"waiting at step {step}", file=sys.stderr, flush=True)
            time.sleep(600)
        rng = np.random.default_rng([seed, step])
        tokens_BxT = np.empty((batch_size, SEQ), np.int32)
        tokens_BxT[:, 0] = rng.integers(0, vocab, batch_size)
        for t in range(1, SEQ):
            tokens_BxT[:, t] = perm[tokens_BxT[:, t - 1]]
        bad = poison_from is not None and step >= poison_from
        return {"tokens": tokens_BxT, "mask": np.ones((batch_size, SEQ), np.float32),
                "poison": np.full((batch_size,), np.nan if bad else 0.0, np.float32)}

    return batches


def medusa_objective(cfg, traces: list | None = None):
    """Medusa's loss on the frozen target's last hidden states, computed inside the step, with EAGLE-style
    uniform noise on them when given a key (so the run's RNG must resume exactly too); `traces` counts the times
    it is traced."""

    def loss_fn(heads, target, batch, rng):
        if traces is not None:
            traces.append(1)
        tokens_BxT = batch["tokens"]
        B, T = tokens_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        hidden_BxTxE = forward(target, cfg, tokens_BxT, positions_BxT, init_cache(cfg, B, T),
                               compute_logits=False).final_hidden
        if rng is not None:
            hidden_BxTxE = hidden_BxTxE + jax.random.uniform(rng, hidden_BxTxE.shape, minval=-2e-3, maxval=2e-3)
        loss, per_head_K = medusa_loss(heads, target, cfg, hidden_BxTxE, tokens_BxT, batch["mask"])
        return loss + jnp.mean(batch["poison"]), {"per_head": per_head_K, "tokens": jnp.sum(batch["mask"])}

    return loss_fn


def run_config(out_dir, total: int, every: int, learning_rate: float = 3e-3, **kw) -> TrainConfig:
    return TrainConfig(total_steps=total, output_dir=str(out_dir), learning_rate=learning_rate, warmup_steps=2,
                       batch_size=8, checkpoint_every=every, keep_checkpoints=2, seed=7, **kw)


def losses(out_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_records(Path(out_dir) / "metrics.jsonl") if "loss" in r]


def steps_on_disk(out_dir) -> list[int]:
    return sorted(int(p.name) for p in checkpoint_dir(out_dir).iterdir() if p.name.isdigit())


def leftovers(out_dir) -> list[str]:
    return [p.name for p in checkpoint_dir(out_dir).iterdir() if TMP_MARK in p.name]


# ----------------------------------------------------------------------------- learning, logging, jit once

def test_medusa_heads_learn(tiny, tmp_path):
    params, cfg = tiny
    traces = []
    heads = init_heads(cfg, HEADS)
    batches = chain_batches(cfg.vocab_size)
    held_out = jax.tree.map(jnp.asarray, batches(0, seed=999, batch_size=8))
    eval_loss = jax.jit(lambda h, t: medusa_objective(cfg)(h, t, held_out, None)[0])
    # The tiny target's tied head is small (init scale 0.02): heads need large features, hence a large rate.
    config = run_config(tmp_path / "run", total=30, every=10, learning_rate=0.1, eval_every=10)

    result = train(config, medusa_objective(cfg, traces), heads, params, batches,
                   evaluate=lambda h, t, step: {"loss": float(eval_loss(h, t))}, progress=False)

    assert len(traces) == 1  # the step is traced and compiled once for the whole run
    records = read_records(result.metrics_file)
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(30))
    assert np.mean(train_losses[-5:]) < np.mean(train_losses[:5]) - 1.0, train_losses
    assert result.loss == train_losses[-1]
    evals = [(r["step"], r["eval"]["loss"]) for r in records if "eval" in r]
    assert [s for s, _ in evals] == [10, 20, 30] and evals[-1][1] < evals[0][1], evals
    last = records[-2]  # the final step's record, before the final evaluation
    assert len(last["per_head"]) == HEADS and last["tokens_per_s"] > 0 and last["lr"] < config.learning_rate
    assert records[0]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(config.learning_rate)  # warm-up of 2
    assert result.plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert steps_on_disk(config.output_dir) == [20, 30]  # keep_checkpoints=2
    restored, step = load_params(config.output_dir, heads)
    assert step == 30
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(result.params[name]))
    np.testing.assert_array_equal(np.asarray(heads["kernel"]), 0.0)  # the caller's heads were not donated

    again = train(config, medusa_objective(cfg, traces), heads, params, batches, progress=False)
    assert again.resumed_from == 30 and len(traces) == 1  # finished: restored, nothing recompiled or rerun
    np.testing.assert_array_equal(np.asarray(again.params["kernel"]), np.asarray(result.params["kernel"]))


# ----------------------------------------------------------------------------- exact resume, interrupts

def main():
    """A run in a subprocess: `python -c "from tests.test_training_loop import main; main()" OUT TOTAL EVERY
    WAIT_AT` (WAIT_AT -1: never wait), under `run_command` as a command runs."""
    out, total, every, wait_at = sys.argv[1], *map(int, sys.argv[2:5])
    cfg = TINY.replace(num_layers=4)
    params = init_params(cfg, jax.random.key(0))  # the `tiny` fixture's model
    batches = chain_batches(cfg.vocab_size, wait_at=None if wait_at < 0 else wait_at)
    config = run_config(out, total, every)

    def body() -> int:
        train(config, medusa_objective(cfg), init_heads(cfg, HEADS), params, batches, progress=False)
        return 0

    sys.exit(run_command(body, prog="train-test"))


class Run:
    """A subprocess running `main`, its stderr collected."""

    def __init__(self, out_dir, total: int, every: int, wait_at: int = -1):
        code = "from tests.test_training_loop import main; main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(out_dir), str(total), str(every), str(wait_at)],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
        self.err = []
        self.reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def wait_until(self, ready, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, "".join(self.err)
            assert time.monotonic() < deadline, "".join(self.err)
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        return rc, "".join(self.err)


def _blocked_after_checkpoint(run: Run, out_dir, step: int):
    return lambda: (checkpoint_dir(out_dir) / str(step)).is_dir() and any("waiting at step" in e for e in run.err)


def test_killed_run_resumes_bit_identical(tiny, tmp_path):
    params, cfg = tiny
    total, every = 12, 4
    reference = train(run_config(tmp_path / "reference", total, every), medusa_objective(cfg), init_heads(cfg, HEADS),
                      params, chain_batches(cfg.vocab_size), progress=False)

    out = tmp_path / "killed"
    run = Run(out, total, every, wait_at=6)  # steps 4 and 5 run past checkpoint 4, then it blocks
    run.wait_until(_blocked_after_checkpoint(run, out, 4))
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish()[0] == -signal.SIGKILL
    assert steps_on_disk(out) == [4] and max(s for s, _ in losses(out)) >= 4  # logged past its checkpoint
    # A save cut short by the kill (orbax's temporary folder, never renamed) must not count as a checkpoint.
    partial = checkpoint_dir(out) / f"8{TMP_MARK}-1700000000"
    partial.mkdir()
    (partial / "junk").write_text("half a checkpoint")

    rc, err = Run(out, total, every).finish()
    assert rc == 0, err
    assert steps_on_disk(out) == [8, 12] and not leftovers(out)
    resumed, step = load_params(out, reference.params)
    assert step == total
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(resumed[name]), np.asarray(reference.params[name]))
    assert losses(out) == losses(tmp_path / "reference")  # every step's loss, the final one included, exactly
    assert losses(out)[-1][1] == reference.loss

    other = dataclasses.replace(run_config(out, total, every), learning_rate=1e-2)
    with pytest.raises(InvalidArgumentError, match="learning_rate 0.003.*this run has 0.01"):
        train(other, medusa_objective(cfg), init_heads(cfg, HEADS), params, chain_batches(cfg.vocab_size))


def test_sigterm_stops_cleanly(tiny, tmp_path):
    out = tmp_path / "run"
    run = Run(out, 12, 4, wait_at=6)
    run.wait_until(_blocked_after_checkpoint(run, out, 4))
    run.proc.send_signal(signal.SIGTERM)
    rc, err = run.finish()
    assert rc == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("train-test: interrupted by SIGTERM") and "Traceback" not in err
    assert steps_on_disk(out) == [4] and not leftovers(out)
    params, cfg = tiny
    heads, step = load_params(out, init_heads(cfg, HEADS))
    assert step == 4 and np.all(np.isfinite(np.asarray(heads["kernel"]))) and np.any(np.asarray(heads["kernel"]))


# ----------------------------------------------------------------------------- sharded

SHARDED = """
import jax, numpy as np
from spec_jax.drafters.medusa import init_heads
from spec_jax.models import init_params
from spec_jax.sharding import make_mesh
from spec_jax.training import train
from tests.conftest import TINY
from tests.test_training_loop import HEADS, chain_batches, losses, medusa_objective, run_config
import sys
assert jax.device_count() == 8, jax.devices()
out = sys.argv[1]
cfg = TINY.replace(num_layers=4)
params = init_params(cfg, jax.random.key(0))
run = lambda name, target, **kw: train(run_config(f"{out}/{name}", 6, 3, **kw), medusa_objective(cfg),
                                       init_heads(cfg, HEADS), target, chain_batches(cfg.vocab_size), progress=False)
one = run("one", params, mesh=None)
mesh = make_mesh(2, 4)
sharded_target = init_params(cfg, jax.random.key(0), mesh=mesh)  # born sharded: heads, MLP, vocab over model
assert len(sharded_target["embed_tokens"]["embedding"].sharding.device_set) == 8
for name, target, kw in [("dp", params, {"mesh": "data=8"}), ("dp_tp", sharded_target, {"mesh": "data=2,model=4"})]:
    r = run(name, target, **kw)
    assert len(r.params["kernel"].sharding.device_set) == 8  # replicated over the mesh
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(np.asarray(r.params[k]), np.asarray(one.params[k]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([l for _, l in losses(f"{out}/{name}")], [l for _, l in losses(f"{out}/one")],
                               rtol=1e-5)
print("OK")
"""


def test_data_and_tensor_parallel_match_one_device(tmp_path):
    """The same run on 8 simulated CPU devices (batch over 8, and 2 x 4 with the target sharded over `model`)
    reaches the parameters of the one-device run within float tolerance (reductions are summed in another order)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- NaN guard

@pytest.mark.parametrize("nan_at", [5, 7], ids=["at-a-checkpoint", "between-checkpoints"])
def test_nan_stops_with_the_last_good_checkpoint(nan_at, tiny, tmp_path):
    params, cfg = tiny
    config = run_config(tmp_path / "run", total=12, every=3)
    with pytest.raises(TrainingDivergedError, match=f"diverged at step {nan_at}: loss nan") as e:
        train(config, medusa_objective(cfg), init_heads(cfg, HEADS), params,
              chain_batches(cfg.vocab_size, poison_from=nan_at), progress=False)
    good = nan_at // 3 * 3  # step 5 is read before checkpoint 6 is written; step 7 one step late, before 9
    assert f"last good checkpoint is step {good}" in str(e.value)
    assert steps_on_disk(config.output_dir)[-1] == good and not leftovers(config.output_dir)
    heads, step = load_params(config.output_dir, init_heads(cfg, HEADS))
    assert step == good and all(np.all(np.isfinite(np.asarray(x))) for x in heads.values())
    assert losses(config.output_dir)[-1][0] == nan_at and np.isnan(losses(config.output_dir)[-1][1])
    assert (tmp_path / "run" / "loss.png").is_file()  # the curve up to the divergence


# ----------------------------------------------------------------------------- config

def test_config_refuses_unknown_keys_and_bad_values(tmp_path):
    good = {"total_steps": 10, "output_dir": str(tmp_path / "o"), "learning-rate": "1e-3", "mesh": None}
    config = TrainConfig.from_mapping(good)
    assert config.learning_rate == 1e-3 and config.total_steps == 10 and config.mesh is None
    with pytest.raises(InvalidArgumentError, match="unknown key 'learning_rte'; the training keys are total_steps"):
        TrainConfig.from_mapping({**good, "learning_rte": 1e-3})
    with pytest.raises(InvalidArgumentError, match="missing output_dir"):
        TrainConfig.from_mapping({"total_steps": 10})
    with pytest.raises(InvalidArgumentError, match="clip_norm: must be a number > 0, got 0.0"):
        TrainConfig.from_mapping({**good, "clip_norm": 0})
    with pytest.raises(InvalidArgumentError, match="batch_size: expected an integer >= 1, got 2.5"):
        TrainConfig.from_mapping({**good, "batch_size": 2.5})
    with pytest.raises(InvalidArgumentError, match="warmup_steps .10. must be below total_steps .10."):
        TrainConfig(total_steps=10, output_dir="o", warmup_steps=10)

    path = tmp_path / "recipe.yaml"
    path.write_text("heads: 3\ntrain:\n  total_steps: 5\n  output_dir: out\n  seeed: 1\n")
    with pytest.raises(InvalidArgumentError, match=r"config file .*recipe.yaml \(train\): unknown key 'seeed'"):
        load_train_config(str(path), section="train")
    path.write_text("heads: 3\ntrain:\n  total_steps: 5\n  output_dir: out\n  seed: 1\n")
    assert load_train_config(str(path), section="train") == TrainConfig(total_steps=5, output_dir="out", seed=1)
