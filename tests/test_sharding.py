"""The same greedy outputs on 1 device and on 8 simulated CPU devices (data- and tensor-parallel)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax
    from spec_jax.decoding import Engine, generate
    from spec_jax.drafters.draft_model import DraftModel
    from spec_jax.models import Config, init_params, truncate
    from spec_jax.models.llama import shard_params
    from spec_jax.sharding import make_mesh
    assert jax.device_count() == 8, jax.devices()
    cfg = Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=8,
                 num_kv_heads=4, head_dim=8, eos_token_ids=())
    params = init_params(cfg, jax.random.key(0))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [5], [6, 7], [1, 1], [2, 2, 2]]
    dparams, dcfg = truncate(params, cfg, 1)
    for drafter, dp in [(None, None), (DraftModel(draft_cfg=dcfg), dparams)]:
        engine = Engine(cfg) if drafter is None else Engine(cfg, drafter)
        ref = generate(engine, params, prompts, 12, draft_params=dp).token_ids
        for data, model in [(8, 1), (2, 4), (1, 8)]:
            mesh = make_mesh(data, model)
            sp = shard_params(params, cfg, mesh)
            sdp = None if dp is None else shard_params(dp, dcfg, mesh)
            with jax.set_mesh(mesh):
                out = generate(engine, sp, prompts, 12, draft_params=sdp, mesh=mesh).token_ids
            assert out == ref, (data, model)
            q = sp["layers_0"]["self_attn"]["q_proj"]["kernel"]
            assert model == 1 or len(q.sharding.device_set) == 8
    print("OK")
""")


def test_sharded_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
