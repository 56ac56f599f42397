"""Checkpoints load straight into their shards: on (data, model) meshes of 8 simulated CPU devices every
parameter has its `param_shardings` sharding and exactly the values of an unsharded load, for HF
safetensors and for GGUF (float and quantised tensors, q/k rows in llama.cpp's permuted layout)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from spec_jax.models import Config, init_params  # noqa: E402
from spec_jax.models.loading import (  # noqa: E402
    _GGUF_GLOBAL_NAMES,
    _GGUF_LAYER_NAMES,
    _flatten,
    _is_kernel,
    _path_to_hf,
    _unpermute_rotary,
    export_hf,
    load_gguf,
    load_hf,
)

Q = gguf.GGMLQuantizationType
CFG = Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
             head_dim=8, attention_bias=True, eos_token_ids=())
# Quantised along `in` in blocks of 32: q/k test the row un-permutation across a quantised tensor, o/down
# (split along `in` on a model axis) test cutting columns out of blocks. The rest stays F32.
MIXED = {"token_embd": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q4_1, "attn_output": Q.Q8_0, "ffn_down": Q.Q4_1,
         "ffn_up": Q.F16}


def _random_params(cfg: Config):
    """init_params' tree with every leaf (norms and biases too) standard normal, so nothing hides."""
    leaves, tree = jax.tree.flatten(init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    return tree.unflatten([rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def _gguf_name(hf_name: str) -> str:
    by_hf = {v: k for k, v in _GGUF_GLOBAL_NAMES.items()}
    if hf_name in by_hf:
        return by_hf[hf_name]
    _, _, layer, *module, leaf = hf_name.split(".")
    short = {v: k for k, v in _GGUF_LAYER_NAMES.items()}[".".join(module)]
    return f"blk.{layer}.{short}.{leaf}"


def _permute_rotary(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert-time permutation of q/k rows (convert_hf_to_gguf.py `permute`)."""
    return w_OxI.reshape(n_heads, 2, w_OxI.shape[0] // n_heads // 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(
        w_OxI.shape)


def write_gguf(params, cfg: Config, path, qtypes: dict) -> str:
    """A llama-architecture GGUF of `params`: q/k permuted as llama.cpp does, matrices typed by `qtypes`."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    for p, value in _flatten(params):
        name = _gguf_name(_path_to_hf(p))
        weight = np.asarray(value).T if _is_kernel(p) else np.asarray(value)  # the checkpoint's [out, in]
        kind = name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            weight = _permute_rotary(weight, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
        qtype = qtypes.get(kind, Q.F32) if weight.ndim == 2 else Q.F32
        data = gguf.quants.quantize(np.ascontiguousarray(weight), qtype)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _whole_tensor_reference(path: str, cfg: Config) -> dict:
    """HF name -> tensor as the whole-tensor loader read it: dequantise all, reshape, un-permute q/k."""
    by_gguf = {_gguf_name(_path_to_hf(p)): _path_to_hf(p) for p, _ in _flatten(init_params(cfg, jax.random.key(0)))}
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = _unpermute_rotary(w, cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads)
        out[by_gguf[t.name]] = w
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same tiny random Llama as an HF directory, an all-F32 GGUF and a mixed quantised GGUF."""
    root = tmp_path_factory.mktemp("ckpt")
    params = _random_params(CFG)
    return dict(params=params, hf=str(export_hf(params, CFG, root / "hf")),
                f32=write_gguf(params, CFG, root / "f32.gguf", {}),
                mixed=write_gguf(params, CFG, root / "mixed.gguf", MIXED))


def test_gguf_equals_whole_tensor_path(checkpoints):
    """Row-wise reads give the old whole-tensor values; an F32 GGUF gives exactly the HF export's values."""
    want = checkpoints["params"]
    for got in (load_hf(checkpoints["hf"])[0], load_gguf(checkpoints["f32"])[0]):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, want)
    mixed, cfg = load_gguf(checkpoints["mixed"])
    assert cfg.attention_bias and not cfg.tie_word_embeddings and cfg.num_kv_heads == CFG.num_kv_heads
    ref = _whole_tensor_reference(checkpoints["mixed"], CFG)
    for p, value in _flatten(mixed):
        got = np.asarray(value).T if _is_kernel(p) else np.asarray(value)
        np.testing.assert_array_equal(got, ref[_path_to_hf(p)], err_msg=str(p))
    exact = dict(_flatten(want))
    rounded = [p for p, value in _flatten(mixed) if not np.array_equal(np.asarray(value), exact[p])]
    assert len(rounded) == 5 * CFG.num_layers + 1  # q, k, o, up, down of each layer and the embedding


SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from spec_jax.models import param_shardings
    from spec_jax.models.loading import _flatten, load_gguf, load_hf
    from spec_jax.sharding import make_mesh
    assert jax.device_count() == 8, jax.devices()
    hf, f32, mixed = sys.argv[1:]
    for load, path, dtype in [(load_hf, hf, "float32"), (load_gguf, f32, "float32"), (load_gguf, mixed, "float32"),
                              (load_hf, hf, "bfloat16"), (load_gguf, mixed, "bfloat16")]:
        ref, cfg = load(path, dtype)
        ref = dict(_flatten(ref))
        for data, model in [(1, 8), (2, 4), (8, 1)]:
            mesh = make_mesh(data, model)
            params, cfg2 = load(path, dtype, mesh=mesh)
            assert cfg2 == cfg
            want = dict(_flatten(param_shardings(cfg, mesh)))
            got = dict(_flatten(params))
            assert got.keys() == want.keys() == ref.keys()
            for p, arr in got.items():
                assert isinstance(arr, jax.Array) and arr.sharding == want[p], (p, arr.sharding, want[p])
                assert arr.dtype == ref[p].dtype and arr.shape == ref[p].shape, p
                shards = arr.addressable_shards
                assert len(shards) == 8, p
                r = np.asarray(ref[p])
                for s in shards:
                    assert s.data.shape == want[p].shard_shape(arr.shape), (p, s.data.shape)
                    np.testing.assert_array_equal(np.asarray(s.data), r[s.index], err_msg=str(p))
                np.testing.assert_array_equal(np.asarray(arr), r, err_msg=str(p))
            if (data, model) == (1, 8):  # really split: q heads 8 x 8 wide, k rows cut mid-head (4 of 8)
                attn = params["layers_0"]["self_attn"]
                assert {s.data.shape for s in attn["q_proj"]["kernel"].addressable_shards} == {(64, 8)}
                assert {s.data.shape for s in attn["k_proj"]["kernel"].addressable_shards} == {(64, 4)}
                assert {s.data.shape for s in attn["k_proj"]["bias"].addressable_shards} == {(4,)}
                assert {s.data.shape for s in attn["o_proj"]["kernel"].addressable_shards} == {(8, 64)}
    print("OK")
""")


def test_sharded_load_equals_unsharded(checkpoints):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    args = [checkpoints["hf"], checkpoints["f32"], checkpoints["mixed"]]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_bf16_checkpoint_file(tmp_path):
    """Most HF checkpoints store bf16: read through safetensors' numpy slices (ml_dtypes), values unchanged."""
    cfg = CFG.replace(dtype="bfloat16")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _random_params(CFG))
    path = export_hf(params, cfg, tmp_path / "bf16")
    got, got_cfg = load_hf(path, "bfloat16")
    assert got_cfg.dtype == "bfloat16"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
                 got, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
