"""The same greedy outputs on 1 device and on 8 simulated CPU devices (data- and tensor-parallel)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import dataclasses
    import jax
    from spec_jax.decoding import Engine, generate
    from spec_jax.drafters.draft_model import DraftModel
    from spec_jax.drafters.token_recycling import TokenRecycling
    from spec_jax.models import Config, init_params, truncate
    from spec_jax.sharding import make_mesh
    assert jax.device_count() == 8, jax.devices()
    cfg = Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=8,
                 num_kv_heads=4, head_dim=8, eos_token_ids=())
    params = init_params(cfg, jax.random.key(0))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [5], [6, 7], [1, 1], [2, 2, 2]]
    dparams, dcfg = truncate(params, cfg, 1)
    for drafter in [None, DraftModel(draft_cfg=dcfg), TokenRecycling(k=4, levels=(4, 4))]:
        engine = Engine(cfg) if drafter is None else Engine(cfg, drafter)
        dp = dparams if isinstance(drafter, DraftModel) else None
        ref = generate(engine, params, prompts, 12, weights=dp)
        for data, model in [(8, 1), (2, 4), (1, 8)]:
            mesh = make_mesh(data, model)
            # Born sharded: initialised under jit with the parameters' shardings as out_shardings.
            sp = init_params(cfg, jax.random.key(0), mesh=mesh)
            sdp = None if dp is None else truncate(sp, cfg, 1)[0]
            e = dataclasses.replace(engine, mesh=mesh)
            with jax.set_mesh(mesh):
                out = generate(e, sp, prompts, 12, weights=sdp)
                timed = generate(e, sp, prompts, 12, weights=sdp, time_phases=True)
            assert out.token_ids == ref.token_ids == timed.token_ids, (data, model)
            assert out.target_forwards == ref.target_forwards
            q = sp["layers_0"]["self_attn"]["q_proj"]["kernel"]
            assert model == 1 or len(q.sharding.device_set) == 8
    print("OK")
""")


def test_sharded_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
