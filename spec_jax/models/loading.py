"""Load Llama-family checkpoints (HF safetensors directories, GGUF files) and export back to HF.

Both loaders produce the same parameter tree as `llama.init_params` (HF module names; projections
as `kernel[in, out]`, the transpose of a checkpoint's `weight[out, in]`). Every tensor's presence and
shape is checked against it from the file headers before any data is read, so a bad checkpoint fails
here with the tensor's name rather than deep inside XLA. Each parameter is then built shard by shard
(`jax.make_array_from_callback` with `llama.param_shardings`): a process reads only the slices its own
devices hold (safetensors slices; GGUF rows of the memory-mapped tensor, dequantised), so a checkpoint
never exists whole on one host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError
from spec_jax.files import atomic_path
from spec_jax.models.llama import Config, init_params, param_shardings, unsupported_architecture

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

_Read = Callable[[str, tuple[slice, ...]], np.ndarray]  # (tensor name, slices in its own orientation) -> block


def _abstract_params(cfg: Config):
    """The parameter tree as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def _match(cfg: Config, shapes: dict[str, tuple[int, ...]], source: str) -> dict[tuple[str, ...], str]:
    """Parameter path -> HF tensor name, checking every name and (header) shape against the config."""
    expected = dict(_flatten(_abstract_params(cfg)))
    names = {}
    for name, shape in shapes.items():
        path = _hf_to_path(name)
        if path is None:
            continue
        if path not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some exports store the tied head too
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for a {cfg.family} model")
        want = expected[path].shape
        if _is_kernel(path):
            want = want[::-1]  # compare in the checkpoint's orientation
        if tuple(shape) != tuple(want):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(shape)}, expected {tuple(want)}; "
                "the checkpoint does not match its config"
            )
        names[path] = name
    missing = [_path_to_hf(p) for p in expected if p not in names]
    if missing:
        raise CheckpointError(
            f"{source}: missing {len(missing)} tensor(s), e.g. {missing[:3]}; the checkpoint is "
            "incomplete (re-download or re-export it)"
        )
    return names


def _build(cfg: Config, names: dict[tuple[str, ...], str], read: _Read, mesh) -> dict:
    """The parameter tree, every leaf made shard by shard on `mesh` (None: the first local device)."""
    abstract = _abstract_params(cfg)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = param_shardings(cfg, mesh)

    def leaf(keys, value, sharding):
        path = tuple(k.key for k in keys)
        name = names[path]
        return _sharded_param(value.shape, sharding, cfg.jnp_dtype, _is_kernel(path), lambda ix: read(name, ix))

    return jax.tree_util.tree_map_with_path(leaf, abstract, shardings)


def _sharded_param(shape, sharding, dtype, kernel: bool, read) -> jax.Array:
    """One parameter from its shards, each distinct one read once as slices in the checkpoint's orientation."""
    blocks = {}

    def shard(index):
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        if bounds not in blocks:
            # A kernel's (in, out) shard is the transpose of the checkpoint weight's (out, in) block.
            slices = tuple(slice(lo, hi) for lo, hi in (bounds[::-1] if kernel else bounds))
            block = read(slices)
            blocks[bounds] = np.ascontiguousarray(block.T if kernel else block, dtype=dtype)
        return blocks[bounds]

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


# ----------------------------------------------------------------------------- HF directories

def load_hf_config(path: str | os.PathLike) -> Config:
    """Read `config.json` of an HF checkpoint directory."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory")
    try:
        hf = json.loads(cfg_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e}); the file is corrupt") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object of settings, got a {type(hf).__name__}")
    try:
        return Config.from_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: missing the key {e.args[0]!r}; the config is incomplete "
                              "(copy it from the model's repository)") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{cfg_file}: a setting has the wrong type ({e})") from None


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of an HF directory: those its index lists, else every `*.safetensors`."""
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
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: listed in the index but missing")
    return [path / name for name in files]


def _unreadable(file: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{file}: cannot read safetensors ({e}); the file is truncated "
                           "or corrupt, re-download or re-export it")


def load_hf(path: str | os.PathLike, dtype: str = "float32", mesh=None) -> tuple[dict, Config]:
    """Load an HF checkpoint directory (`config.json` + one or many `*.safetensors`) into its shards on `mesh`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = load_hf_config(path).replace(dtype=dtype)
    with contextlib.ExitStack() as stack:
        opened = {}  # tensor name -> (open file, its path)
        for file in safetensors_files(path):
            try:
                f = stack.enter_context(safe_open(file, framework="numpy"))
            except (SafetensorError, OSError, ValueError) as e:
                raise _unreadable(file, e) from e
            opened.update(dict.fromkeys(f.keys(), (f, file)))
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name, (f, _) in opened.items()}
        names = _match(cfg, shapes, str(path))

        def read(name, slices):
            f, file = opened[name]
            try:
                return f.get_slice(name)[slices]
            except (SafetensorError, OSError, ValueError) as e:
                raise _unreadable(file, e) from e

        return _build(cfg, names, read, mesh), cfg


def export_hf(params, cfg: Config, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write params as an HF directory that `transformers.AutoModelForCausalLM` loads.

    Written to a temporary sibling directory first and renamed, so a crash leaves no half export.
    """
    from safetensors.flax import save_file

    with atomic_path(out_dir, directory=True) as tmp:
        flat = _flatten(jax.device_get(params))
        tensors = {_path_to_hf(p): jnp.asarray(v.T if _is_kernel(p) else v) for p, v in flat}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


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


def _gguf_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in the checkpoint's orientation ([out, in]; a bias stored as [1, n] -> [n])."""
    shape = tuple(int(d) for d in reversed(t.shape))
    return shape[1:] if t.name.endswith("bias") and len(shape) == 2 and shape[0] == 1 else shape


def _gguf_rows(t, lo: int, hi: int, cols: slice | None) -> np.ndarray:
    """Rows [lo, hi) (and `cols` of a matrix) of a GGUF tensor, dequantising only the blocks they cover."""
    import gguf

    if cols is None:  # norms and biases: one short row, dequantised whole
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)[lo:hi]
    # Quantised data is [rows, bytes] in blocks of `size` values stored in `nbytes` bytes along `in`.
    size, nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type] if t.data.dtype == np.uint8 else (1, 1)
    b0, b1 = cols.start // size, -(-cols.stop // size)
    w = gguf.quants.dequantize(t.data[lo:hi, b0 * nbytes:b1 * nbytes], t.tensor_type)
    return w[:, cols.start - b0 * size:cols.stop - b0 * size]


def _gguf_read(t, rows_total: int, n_heads: int | None, slices: tuple[slice, ...]) -> np.ndarray:
    """A block of a GGUF tensor; q/k rows, permuted by llama.cpp within each head, are read as whole heads."""
    rows, cols = slices[0], (slices[1] if len(slices) > 1 else None)
    if n_heads is None:
        return _gguf_rows(t, rows.start, rows.stop, cols)
    per_head = rows_total // n_heads
    h0, h1 = rows.start // per_head, -(-rows.stop // per_head)
    w = _unpermute_rotary(_gguf_rows(t, h0 * per_head, h1 * per_head, cols), h1 - h0)  # mixes rows of a head
    return w[rows.start - h0 * per_head:rows.stop - h0 * per_head]


def _rotary_heads(cfg: Config, gguf_name: str) -> int | None:
    """Heads whose rows llama.cpp permuted in this tensor (llama q/k weights and biases), else None."""
    if cfg.family != "llama":
        return None
    if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        return cfg.num_heads
    if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        return cfg.num_kv_heads
    return None


def load_gguf_config(path: str | os.PathLike, dtype: str = "float32") -> Config:
    """The Config of a GGUF file, from its header alone."""
    path = Path(path)
    return gguf_config(_gguf_reader(path), path, dtype)


def load_gguf(path: str | os.PathLike, dtype: str = "float32", mesh=None) -> tuple[dict, Config]:
    """Load a GGUF file into its shards on `mesh`, dequantising only the rows each shard needs."""
    path = Path(path)
    reader = _gguf_reader(path)
    cfg = gguf_config(reader, path, dtype)
    tensors = {name: t for t in reader.tensors if (name := _gguf_to_hf(t.name)) is not None}
    shapes = {name: _gguf_shape(t) for name, t in tensors.items()}
    names = _match(cfg, shapes, str(path))

    def read(name, slices):
        t = tensors[name]
        try:
            return _gguf_read(t, shapes[name][0], _rotary_heads(cfg, t.name), slices)
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor {t.name} uses quantisation "
                                  f"{t.tensor_type.name}, which gguf cannot dequantise") from e
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: tensor {t.name} is truncated or corrupt ({e})") from e

    return _build(cfg, names, read, mesh), cfg
