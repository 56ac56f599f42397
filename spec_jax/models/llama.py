"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as Flax Linen used purely functionally.

Everything Llama-shaped lives here: `Config`, the parameter tree (every projection a `kernel[in, out]`,
which XLA:CPU multiplies by a few tokens much faster than HF's `weight[out, in]`; see `Linear`), the
KV cache, and `forward`, which serves prefill, one-token decode and tree verification alike.

Parameters are a plain pytree `{"embed_tokens": {"embedding"}, "layers_0": {...}, "norm": {...},
"lm_head": {...}}` whose module names mirror Hugging Face's, one dict per layer (per-layer arrays run
several times faster than a stacked `[layers, ...]` array on XLA:CPU; see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spec_jax.errors import CacheOverflowError, InvalidArgumentError, UnsupportedArchitectureError

Array = jax.Array

# HF `architectures` entry -> our family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_FAMILY_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def unsupported_architecture(name: str) -> UnsupportedArchitectureError:
    """The error for an architecture we do not implement, listing those we do."""
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    return UnsupportedArchitectureError(
        f"unsupported architecture {name!r}; spec-jax supports {supported} "
        "(GGUF: general.architecture 'llama' or 'qwen2')"
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """Static hyper-parameters of a Llama-family model (hashable, usable as a jit static arg)."""

    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted (key, value) pairs of HF's dict
    rope_freq_factors: tuple[float, ...] | None = None  # llama.cpp `rope_freqs` (GGUF llama 3.1+)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    dtype: str = "float32"

    def __post_init__(self):
        if self.family not in _FAMILY_TO_ARCH:
            raise unsupported_architecture(self.family)
        if self.num_heads % self.num_kv_heads:
            raise InvalidArgumentError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise InvalidArgumentError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        scaling = dict(self.rope_scaling or ())
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise UnsupportedArchitectureError(
                f"rope_scaling type {kind!r} is not supported; use 'default', 'linear' or 'llama3'"
            )

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> Config:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict) -> Config:
        """Build a Config from a Hugging Face `config.json` dictionary."""
        archs = hf.get("architectures") or [_FAMILY_TO_ARCH.get(hf.get("model_type", ""), "")]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise unsupported_architecture(arch or hf.get("model_type", "<none>"))
        family = SUPPORTED_ARCHITECTURES[arch]
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
        theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            sliding_window=window if family != "llama" else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            dtype="bfloat16" if hf.get("torch_dtype", hf.get("dtype")) == "bfloat16" else "float32",
        )

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` dictionary for this Config."""
        if self.rope_freq_factors is not None:
            raise UnsupportedArchitectureError(
                "this model carries llama.cpp rope_freqs factors that HF config.json cannot express"
            )
        hf = {
            "architectures": [_FAMILY_TO_ARCH[self.family]],
            "model_type": _MODEL_TYPE[self.family],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
            "hidden_act": "silu",
            "torch_dtype": self.dtype,
        }
        if self.family == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        else:
            hf["sliding_window"] = self.sliding_window
            hf["use_sliding_window"] = self.sliding_window is not None
        return hf


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: Config) -> np.ndarray:
    """Inverse frequencies [head_dim/2] including linear / llama3 scaling and GGUF freq factors."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1 "frequency-dependent" scaling (Meta's reference implementation).
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    if cfg.rope_freq_factors is not None:
        inv = inv / np.asarray(cfg.rope_freq_factors, dtype=np.float64)
    return inv.astype(np.float32)


def apply_rope(x_BxTxHxD: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
    """Rotate q or k by their positions (HF 'rotate_half' layout)."""
    angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BxTxF)[:, :, None, :]
    sin = jnp.sin(angles_BxTxF)[:, :, None, :]
    x = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


# ----------------------------------------------------------------------------- KV cache

@struct.dataclass
class KVCache:
    """Per-layer K/V buffers `[B, S, kv_heads, head_dim]` and per-sequence committed lengths.

    Entries at slots `>= lengths[b]` are scratch: `forward` writes its T new tokens there and
    the caller decides (via `commit`) which of them become committed.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    lengths: Array  # [B] int32

    @property
    def size(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def init_cache(cfg: Config, batch: int, size: int, dtype=None) -> KVCache:
    """An empty cache of `size` slots per sequence."""
    if cfg.sliding_window is not None and size > cfg.sliding_window:
        raise CacheOverflowError(
            f"cache size {size} exceeds the model's sliding window {cfg.sliding_window}; "
            "sliding-window attention is not implemented, use a smaller --max-new-tokens"
        )
    dtype = dtype or cfg.jnp_dtype
    shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))


def _write_rows(buf_BxSx: Array, new_BxTx: Array, starts_B: Array) -> Array:
    """Write each sequence's new rows at its own offset (in place under donation)."""
    def one(buf, new, start):
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=0)
    return jax.vmap(one)(buf_BxSx, new_BxTx, starts_B)


def commit(cache: KVCache, path_BxP: Array, num_B: Array) -> KVCache:
    """Move the entries at slots `lengths + path[:, j]` to `lengths + j` and advance lengths by `num`.

    `path` lists, in order, the offsets (relative to the committed length) of the scratch entries
    that become committed; entries past `num` are ignored. Rejected entries are simply left behind
    in the scratch region; nothing is recomputed.
    """
    starts = cache.lengths
    new_lengths = starts + num_B.astype(jnp.int32)
    if path_BxP.shape[1] <= 1:  # only the root: it already sits at its final slot
        return cache.replace(lengths=new_lengths)
    slots_BxP = starts[:, None] + path_BxP

    def move(buf):
        rows = jnp.take_along_axis(buf, slots_BxP[:, :, None, None], axis=1)
        return _write_rows(buf, rows, starts)

    return KVCache(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v)), lengths=new_lengths)


def attention_mask(lengths_B: Array, size: int, tree_mask_BxTxC: Array | None, t: int) -> Array:
    """[B, T, S] mask: committed slots plus the new block's causal or tree mask.

    A tree mask `[B, T, C]` (C >= T) covers the C scratch slots from `lengths`: the first C - T
    were written by earlier calls (a drafter growing a tree level by level), the last T are the
    new tokens.
    """
    rel_BxTxS = (jnp.arange(size)[None, None, :] - lengths_B[:, None, None]).astype(jnp.int32)
    rel_BxTxS = jnp.broadcast_to(rel_BxTxS, (lengths_B.shape[0], t, size))
    committed = rel_BxTxS < 0
    if tree_mask_BxTxC is None:
        new = (rel_BxTxS >= 0) & (rel_BxTxS <= jnp.arange(t)[None, :, None])
    else:
        c = tree_mask_BxTxC.shape[2]
        idx = jnp.clip(rel_BxTxS, 0, c - 1)
        new = (rel_BxTxS >= 0) & (rel_BxTxS < c) & jnp.take_along_axis(tree_mask_BxTxC, idx, axis=2)
    return committed | new


# ----------------------------------------------------------------------------- modules

def _dot_out_in(x: Array, w_OxI: Array) -> Array:
    """x[..., I] @ w[O, I]^T without materialising the transpose (the tied LM head)."""
    return jax.lax.dot_general(x, w_OxI.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))


class Linear(nn.Module):
    """A projection `x @ kernel[in, out]` with an optional bias.

    Kernels are stored [in, out] (checkpoints' `weight[out, in]` is transposed at load and export):
    XLA:CPU multiplies a few tokens by an [in, out] matrix far faster than by an [out, in] one
    (30 layers of SmolLM2's projections: 2 tokens 14.0 ms vs 23.9 ms, 8 tokens 18.1 vs 23.0, one
    token the same), and verifying a draft is exactly that product.
    """

    in_features: int
    out_features: int
    axes: tuple[str, str]  # logical axes of the kernel, (in, out)
    use_bias: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes)
        w = self.param("kernel", init, (self.in_features, self.out_features), self.param_dtype)
        y = jnp.dot(x, w.astype(x.dtype))
        if self.use_bias:
            b_init = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:])
            y = y + self.param("bias", b_init, (self.out_features,), self.param_dtype).astype(y.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        w = self.param("weight", init, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * w.astype(jnp.float32)).astype(x.dtype)


def attend(q_BxTxHxD: Array, k_BxTxKxD: Array, v_BxTxKxD: Array, k_cache: Array, v_cache: Array,
           mask_BxTxS: Array, lengths_B: Array) -> tuple[Array, Array, Array]:
    """Write the new K/V at `lengths` and attend over the cache: returns ([B, T, H*D], k_cache, v_cache).

    On XLA:CPU each call copies the layer's whole K and V buffers into head-major order for the two
    batched dots (`scripts/profile_ar.py`: 3.4 ms of a 27 ms decode step at 256 tokens of context,
    12 of 38 ms at 2,048).
    """
    B, T, H, D = q_BxTxHxD.shape
    K = k_BxTxKxD.shape[2]
    dt = q_BxTxHxD.dtype
    k_cache = _write_rows(k_cache, k_BxTxKxD, lengths_B)
    v_cache = _write_rows(v_cache, v_BxTxKxD, lengths_B)
    q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_cache.astype(dt),
                        preferred_element_type=jnp.float32) / math.sqrt(D)
    scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache.astype(dt)).reshape(B, T, H * D)
    return out, k_cache, v_cache


class Attention(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x_BxTxE, positions_BxT, mask_BxTxS, k_cache, v_cache, lengths_B):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        B, T, _ = x_BxTxE.shape
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        proj = dict(in_features=cfg.hidden_size, use_bias=cfg.attention_bias, param_dtype=dt)
        q = Linear(out_features=H * D, axes=("embed", "heads"), name="q_proj", **proj)(x_BxTxE)
        k = Linear(out_features=K * D, axes=("embed", "kv_heads"), name="k_proj", **proj)(x_BxTxE)
        v = Linear(out_features=K * D, axes=("embed", "kv_heads"), name="v_proj", **proj)(x_BxTxE)
        inv_freq = rope_inv_freq(cfg)
        q_BxTxHxD = apply_rope(q.reshape(B, T, H, D), positions_BxT, inv_freq)
        k_BxTxKxD = apply_rope(k.reshape(B, T, K, D), positions_BxT, inv_freq)
        out, k_cache, v_cache = attend(q_BxTxHxD, k_BxTxKxD, v.reshape(B, T, K, D), k_cache, v_cache,
                                       mask_BxTxS, lengths_B)
        o = Linear(H * D, cfg.hidden_size, axes=("heads", "embed"), name="o_proj", param_dtype=dt)
        return o(out), k_cache, v_cache


class MLP(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        up = dict(in_features=cfg.hidden_size, out_features=cfg.intermediate_size, axes=("embed", "mlp"),
                  param_dtype=dt)
        gate = Linear(name="gate_proj", **up)(x)
        h = jax.nn.silu(gate) * Linear(name="up_proj", **up)(x)
        down = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), name="down_proj", param_dtype=dt)
        return down(h)


class DecoderLayer(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x, positions, mask, k_cache, v_cache, lengths):
        cfg = self.cfg
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=cfg.jnp_dtype)
        h, k_cache, v_cache = Attention(cfg, name="self_attn")(
            RMSNorm(name="input_layernorm", **norm)(x), positions, mask, k_cache, v_cache, lengths)
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(name="post_attention_layernorm", **norm)(x))
        return x, k_cache, v_cache


class Output(NamedTuple):
    logits: Array | None  # [B, T, V] (or [B, K, V] for `logits_at`) in float32
    hidden: dict[int, Array]  # residual stream after i layers, for i in return_hidden
    cache: KVCache
    final_hidden: Array  # [B, T, E] residual stream after the last layer run, before the final norm


class Transformer(nn.Module):
    cfg: Config

    def setup(self):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, param_dtype=dt, dtype=dt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, param_dtype=dt)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), param_dtype=dt)

    def __call__(self, tokens_BxT, positions_BxT, cache: KVCache, tree_mask=None, layers=None,
                 return_hidden=(), logits_at=None, compute_logits=True, layer_gates=None):
        return self.from_embeddings(self.embed_tokens(tokens_BxT), positions_BxT, cache, tree_mask, layers,
                                    return_hidden, logits_at, compute_logits, layer_gates)

    def from_embeddings(self, x_BxTxE, positions_BxT, cache: KVCache, tree_mask=None, layers=None,
                        return_hidden=(), logits_at=None, compute_logits=True, layer_gates=None):
        cfg = self.cfg
        layers = range(cfg.num_layers) if layers is None else layers
        x = x_BxTxE
        T = x_BxTxE.shape[1]
        mask = attention_mask(cache.lengths, cache.size, tree_mask, T)
        write_at = cache.lengths if tree_mask is None else cache.lengths + (tree_mask.shape[2] - T)
        k, v = list(cache.k), list(cache.v)
        hidden = {0: x} if 0 in return_hidden else {}
        for i in layers:
            with jax.named_scope(f"layer_{i}"):
                y, k_i, v_i = self.layers[i](x, positions_BxT, mask, k[i], v[i], write_at)
            if layer_gates is None:
                x, k[i], v[i] = y, k_i, v_i
            else:  # a traced skip mask: a gated-off layer passes the residual stream through
                x = jnp.where(layer_gates[i], y, x)
                k[i], v[i] = k_i, v_i
            if i + 1 in return_hidden:
                hidden[i + 1] = x
        new_cache = KVCache(k=tuple(k), v=tuple(v), lengths=cache.lengths)
        if not compute_logits:
            return Output(logits=None, hidden=hidden, cache=new_cache, final_hidden=x)
        h = x if logits_at is None else jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
        return Output(logits=self.logits(self.norm(h)), hidden=hidden, cache=new_cache, final_hidden=x)

    def embed(self, tokens_BxT):
        return self.embed_tokens(tokens_BxT)

    def final_norm(self, h_BxTxE):
        return self.norm(h_BxTxE)

    def logits(self, h_BxTxE):
        """Final-norm'd hidden states -> float32 logits through the (possibly tied) head."""
        if self.cfg.tie_word_embeddings:
            return _dot_out_in(h_BxTxE, self.embed_tokens.embedding).astype(jnp.float32)
        return self.lm_head(h_BxTxE).astype(jnp.float32)

    def head(self, h_BxTxE):
        """Final norm then LM head: what a draft head or early exit uses to read out logits."""
        return self.logits(self.norm(h_BxTxE))


# ----------------------------------------------------------------------------- functional API

def forward(params, cfg: Config, tokens_BxT: Array, positions_BxT: Array, cache: KVCache,
            tree_mask_BxTxT: Array | None = None, layers: tuple[int, ...] | None = None,
            return_hidden: tuple[int, ...] = (), logits_at: Array | None = None,
            compute_logits: bool = True, layer_gates: Array | None = None) -> Output:
    """Run T new tokens against the committed cache; returns logits, hidden states and the cache.

    New K/V entries are written at slots `cache.lengths[b] + t`; `cache.lengths` is returned
    unchanged (use `commit` to advance it). `tree_mask[b, i, j]` (True when j is i or an ancestor of
    i) replaces the causal mask among the new tokens; a `[B, T, C]` mask also sees the C - T
    scratch entries before them, and the new entries go to `lengths + C - T` (see `attention_mask`).
    `layers` runs a static subset of layers (layer skipping, early exit); `layer_gates[L]` (bool,
    traced) skips layers without recompiling, at the cost of computing them (skip-set search);
    `return_hidden` names residual-stream depths to return; `logits_at[B, K]` restricts the head
    to those token indices.
    """
    return Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT, cache,
                                  tree_mask_BxTxT, layers, tuple(return_hidden), logits_at,
                                  compute_logits, layer_gates)


def forward_embeddings(params, cfg: Config, x_BxTxE: Array, positions_BxT: Array, cache: KVCache,
                       tree_mask_BxTxT: Array | None = None, layers: tuple[int, ...] | None = None,
                       return_hidden: tuple[int, ...] = (), logits_at: Array | None = None,
                       compute_logits: bool = True) -> Output:
    """`forward` from input embeddings instead of token ids (an EAGLE-style drafter feeds features)."""
    return Transformer(cfg).apply({"params": params}, x_BxTxE, positions_BxT, cache, tree_mask_BxTxT, layers,
                                  tuple(return_hidden), logits_at, compute_logits,
                                  method=Transformer.from_embeddings)


def embed(params, cfg: Config, tokens_BxT: Array) -> Array:
    """Input embeddings [B, T, E] of token ids."""
    return Transformer(cfg).apply({"params": params}, tokens_BxT, method=Transformer.embed)


def final_norm(params, cfg: Config, hidden_BxTxE: Array) -> Array:
    """The final RMSNorm applied to residual-stream hidden states."""
    return Transformer(cfg).apply({"params": params}, hidden_BxTxE, method=Transformer.final_norm)


def lm_head(params, cfg: Config, normed_BxTxE: Array) -> Array:
    """Float32 logits from final-normed hidden states through the (possibly tied) LM head."""
    return Transformer(cfg).apply({"params": params}, normed_BxTxE, method=Transformer.logits)


def head(params, cfg: Config, hidden_BxTxE: Array) -> Array:
    """Logits from residual-stream hidden states (final norm + LM head)."""
    return Transformer(cfg).apply({"params": params}, hidden_BxTxE, method=Transformer.head)


def init_params(cfg: Config, rng: Array, mesh=None):
    """Random parameters (tiny test models, fresh draft models), born sharded on `mesh` when given:
    the shapes are traced abstractly and the initialiser runs under jit with the parameters' shardings
    as its out_shardings, so the whole tree never exists on one device."""
    if mesh is None:
        return nn.unbox(_init_boxed(cfg, rng))
    return jax.jit(lambda r: nn.unbox(_init_boxed(cfg, r)), out_shardings=param_shardings(cfg, mesh))(rng)


def _init_boxed(cfg: Config, rng: Array):
    cache = init_cache(cfg, 1, 8)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(cfg).init(rng, tokens, tokens, cache)["params"]


def param_logical_axes(cfg: Config):
    """A pytree like params whose leaves are tuples of logical axis names."""
    boxed = jax.eval_shape(lambda: _init_boxed(cfg, jax.random.key(0)))
    return jax.tree.map(lambda b: tuple(b.names), boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_bytes(params) -> int:
    """Total bytes of a parameter pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def truncate(params, cfg: Config, num_layers: int):
    """The first `num_layers` layers with the final norm and head: an early-exit draft model."""
    if not 0 < num_layers <= cfg.num_layers:
        raise InvalidArgumentError(f"num_layers must be in [1, {cfg.num_layers}], got {num_layers}")
    keep = {k: v for k, v in params.items()
            if not k.startswith("layers_") or int(k.split("_")[1]) < num_layers}
    return keep, cfg.replace(num_layers=num_layers)


def param_shardings(cfg: Config, mesh):
    """NamedShardings of every parameter on `mesh`, from their logical axes (`spec_jax.sharding.RULES`)."""
    from spec_jax.sharding import tree_shardings

    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return tree_shardings(param_logical_axes(cfg), abstract, mesh)


CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")


def cache_shardings(cache: KVCache, mesh) -> KVCache:
    """A KVCache of NamedShardings: batch over `data`, KV heads over `model` (replicated where not divisible)."""
    from spec_jax.sharding import logical_sharding

    kv = lambda x: logical_sharding(CACHE_AXES, x.shape, mesh)
    return KVCache(k=tuple(map(kv, cache.k)), v=tuple(map(kv, cache.v)),
                   lengths=logical_sharding(("batch",), cache.lengths.shape, mesh))
