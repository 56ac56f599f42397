"""Multi-host for real: two processes joined by `jax.distributed.initialize` (CPU devices, gloo
collectives), 4 simulated devices each, one data x model mesh over all 8. Sharded greedy generates
(a draft model, fused and phase-timed; Token Recycling with its matrix carried to a second request),
and prefill alone, equal a single-process run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 4)
    port, pid = sys.argv[1], int(sys.argv[2])
    if pid >= 0:
        jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    import numpy as np
    from spec_jax.decoding import Engine, generate
    from spec_jax.drafters.draft_model import DraftModel
    from spec_jax.drafters.token_recycling import TokenRecycling
    from spec_jax.models import Config, init_params, truncate
    from spec_jax.sharding import fetch, make_mesh

    cfg = Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=8,
                 num_kv_heads=4, head_dim=8, eos_token_ids=())
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    if pid >= 0:
        assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
        mesh = make_mesh(2, 4)  # data over both processes' devices, model within
    else:
        mesh = None
    params = init_params(cfg, jax.random.key(0), mesh=mesh)
    weights, dcfg = truncate(params, cfg, 1)
    engine = Engine(cfg, DraftModel(draft_cfg=dcfg), mesh=mesh)
    gen = generate(engine, params, prompts, 12, weights=weights)
    timed = generate(engine, params, prompts, 12, weights=weights, time_phases=True)
    tr = Engine(cfg, TokenRecycling(k=4, levels=(4, 4)), mesh=mesh)
    cold = generate(tr, params, prompts, 12)
    warm = generate(tr, params, prompts, 12, carry=cold.carry)  # the matrix carried across requests
    padded, lens = engine.pad_prompts(prompts)
    state = engine.prefill(params, weights, None, padded, lens, 12, 0, engine.cache_size(int(lens.max()), 12))
    k0 = fetch(state.cache.k[0], mesh)
    out = {"tokens": gen.token_ids, "forwards": gen.target_forwards, "first": engine.outputs(state),
           "timed": timed.token_ids, "tr": [cold.token_ids, warm.token_ids, warm.target_forwards],
           "k0_sum": float(np.abs(k0).sum()), "k0_shape": list(k0.shape)}
    if pid >= 0:
        local = state.cache.k[0].addressable_shards
        out["local_shards"] = len(local)
        out["local_shard_shape"] = list(local[0].data.shape)
    print("RESULT " + json.dumps(out))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.slow
def test_two_process_generate_and_prefill_equal_single_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), port, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    single = subprocess.run([sys.executable, str(script), port, "-1"], env=env, capture_output=True, text=True,
                            timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    ref = _result(single.stdout)
    for stdout, _ in outs:
        got = _result(stdout)
        assert got["tokens"] == ref["tokens"] and got["forwards"] == ref["forwards"]
        assert got["timed"] == ref["tokens"]  # the phase-timed halves, jitted with the same shardings
        assert got["tr"] == ref["tr"] and got["tr"][0] == got["tr"][1]  # carry (hot start) across processes
        assert got["first"] == ref["first"]  # prefill alone: the first token of every sequence
        assert got["k0_shape"] == ref["k0_shape"]
        assert abs(got["k0_sum"] - ref["k0_sum"]) <= 1e-4 * ref["k0_sum"]
        # Each process holds only its own devices' shards: 4 of the 8, each a quarter of the batch
        # (data=2) and of the KV heads (model=4).
        assert got["local_shards"] == 4
        assert got["local_shard_shape"][0] == 2 and got["local_shard_shape"][2] == 1
