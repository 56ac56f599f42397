"""Load Llama-family checkpoints (HF safetensors directories, GGUF files) and export back to HF.

Both loaders produce the same parameter tree as `llama.init_params` (HF module names; projections
as `kernel[in, out]`, the transpose of a checkpoint's `weight[out, in]`) and check every tensor's
presence and shape against it, so a bad checkpoint fails here with the
tensor's name rather than deep inside XLA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError
from spec_jax.models.llama import Config, init_params, unsupported_architecture

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------- names

def _hf_to_path(name: str) -> tuple[str, ...] | None:
    """HF tensor name -> path in our parameter tree (None for buffers we do not keep)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding")
    if name == "model.norm.weight":
        return ("norm", "weight")
    if name == "lm_head.weight":
        return ("lm_head", "kernel")
    m = _LAYER.match(name)
    if m:
        *module, leaf = m.group(2).split(".")
        if leaf == "weight" and module[-1].endswith("_proj"):
            leaf = "kernel"  # stored transposed, see `_is_kernel`
        return (f"layers_{m.group(1)}", *module, leaf)
    return ("<unknown>", name)


def _is_kernel(path: tuple[str, ...]) -> bool:
    """Projection matrices are kept as kernel[in, out]: the transpose of the checkpoint's weight."""
    return path[-1] == "kernel"


def _path_to_hf(path: tuple[str, ...]) -> str:
    if path == ("embed_tokens", "embedding"):
        return "model.embed_tokens.weight"
    if path[0] in ("norm",):
        return "model.norm.weight"
    if path[0] == "lm_head":
        return "lm_head.weight"
    layer = path[0].split("_")[1]
    leaf = "weight" if _is_kernel(path) else path[-1]
    return ".".join(("model", "layers", layer, *path[1:-1], leaf))


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_to_hf(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


# ----------------------------------------------------------------------------- assembling

def _assemble(cfg: Config, tensors: dict[str, np.ndarray | jax.Array], source: str):
    """Place HF-named tensors into our parameter tree, checking names and shapes."""
    expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    flat_expected = {path: leaf for path, leaf in _flatten(expected)}
    params: dict = {}
    for name, value in tensors.items():
        path = _hf_to_path(name)
        if path is None:
            continue
        if path not in flat_expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some exports store the tied head too
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for a {cfg.family} model")
        want = flat_expected[path].shape
        if _is_kernel(path):
            want = want[::-1]  # compare in the checkpoint's orientation
        if tuple(value.shape) != tuple(want):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(want)}; "
                "the checkpoint does not match its config"
            )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        value = np.asarray(value).T if _is_kernel(path) else value
        node[path[-1]] = jnp.asarray(value, dtype=cfg.jnp_dtype)
    missing = [_path_to_hf(p) for p in flat_expected if not _has(params, p)]
    if missing:
        raise CheckpointError(
            f"{source}: missing {len(missing)} tensor(s), e.g. {missing[:3]}; the checkpoint is "
            "incomplete (re-download or re-export it)"
        )
    return params


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _has(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


# ----------------------------------------------------------------------------- HF directories

def load_hf_config(path: str | os.PathLike) -> Config:
    """Read `config.json` of an HF checkpoint directory."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e}); the file is corrupt") from e
    return Config.from_hf(hf)


def load_hf(path: str | os.PathLike, dtype: str = "float32") -> tuple[dict, Config]:
    """Load an HF checkpoint directory (`config.json` + one or many `*.safetensors`)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = load_hf_config(path).replace(dtype=dtype)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed safetensors index ({e})") from e
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{path}: no *.safetensors weights found (pytorch .bin checkpoints are not supported; "
            "re-save with `model.save_pretrained(dir, safe_serialization=True)`)"
        )
    tensors = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the index but missing")
        try:
            with safe_open(file, framework="flax") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file is truncated "
                                  "or corrupt, re-download or re-export it") from e
    return _assemble(cfg, tensors, str(path)), cfg


def export_hf(params, cfg: Config, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write params as an HF directory that `transformers.AutoModelForCausalLM` loads.

    Written to a temporary sibling directory first and renamed, so a crash leaves no half export.
    """
    from safetensors.flax import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        flat = _flatten(jax.device_get(params))
        tensors = {_path_to_hf(p): jnp.asarray(v.T if _is_kernel(p) else v) for p, v in flat}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------- GGUF

def _gguf_reader(path: Path):
    import gguf

    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct.error, ...
        raise CheckpointError(f"{path}: cannot parse GGUF ({type(e).__name__}: {e}); the file is "
                              "truncated or corrupt, re-download it") from e


def gguf_metadata(path: str | os.PathLike) -> dict:
    """Every key/value of a GGUF file's header (arrays as lists), read without loading tensors."""
    reader = _gguf_reader(Path(path))
    return {name: field.contents() for name, field in reader.fields.items() if field.types}


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, path: Path, dtype: str = "float32") -> Config:
    """Config from GGUF metadata (llama and qwen2 architectures)."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise unsupported_architecture(f"gguf:{arch}")
    try:
        heads = int(_field(reader, f"{arch}.attention.head_count"))
        hidden = int(_field(reader, f"{arch}.embedding_length"))
        n_vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        scaling = None
        if _field(reader, f"{arch}.rope.scaling.type") == "linear":
            scaling = (("factor", float(_field(reader, f"{arch}.rope.scaling.factor"))),
                       ("rope_type", "linear"))
        elif _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
            raise UnsupportedArchitectureError(
                f"{path}: GGUF rope scaling {_field(reader, f'{arch}.rope.scaling.type')!r} "
                "is not supported")
        freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
        names = {t.name for t in reader.tensors}
        eos = _field(reader, "tokenizer.ggml.eos_token_id")
        return Config(
            family="qwen2" if arch == "qwen2" else "llama",
            vocab_size=int(n_vocab),
            hidden_size=hidden,
            intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
            num_layers=int(_field(reader, f"{arch}.block_count")),
            num_heads=heads,
            num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
            rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rope_freq_factors=tuple(float(x) for x in np.asarray(freqs.data).ravel())
            if freqs is not None else None,
            attention_bias="blk.0.attn_q.bias" in names,
            tie_word_embeddings="output.weight" not in names,
            max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
            dtype=dtype,
        )
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: GGUF metadata is incomplete ({e})") from e


def _unpermute_rotary(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of q/k rows into its interleaved rotary layout."""
    out, inp = w_OxI.shape[0], w_OxI.shape[1:]
    w = w_OxI.reshape(n_heads, out // n_heads // 2, 2, *inp)
    return w.swapaxes(1, 2).reshape(w_OxI.shape)


def load_gguf(path: str | os.PathLike, dtype: str = "float32") -> tuple[dict, Config]:
    """Load a GGUF file, dequantising every tensor with the `gguf` package."""
    import gguf

    path = Path(path)
    reader = _gguf_reader(path)
    cfg = gguf_config(reader, path, dtype)
    tensors = {}
    for t in reader.tensors:
        name = _gguf_to_hf(t.name)
        if name is None:
            continue
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor {t.name} uses quantisation "
                                  f"{t.tensor_type.name}, which gguf cannot dequantise") from e
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: tensor {t.name} is truncated or corrupt ({e})") from e
        w = np.asarray(w, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
        if cfg.family == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute_rotary(w, cfg.num_heads)
        elif cfg.family == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute_rotary(w, cfg.num_kv_heads)
        if w.ndim == 2 and w.shape[0] == 1 and name.endswith("bias"):
            w = w[0]
        tensors[name] = w
    return _assemble(cfg, tensors, str(path)), cfg
