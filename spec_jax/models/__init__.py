"""Llama-family models: config, parameters, KV cache, forward, loading and the named registry."""

from spec_jax.models.llama import (
    Config,
    KVCache,
    Output,
    cache_shardings,
    commit,
    embed,
    final_norm,
    forward,
    forward_embeddings,
    head,
    init_cache,
    init_params,
    lm_head,
    param_bytes,
    param_logical_axes,
    param_shardings,
    truncate,
)

__all__ = ["Config", "KVCache", "Output", "cache_shardings", "commit", "embed", "final_norm", "forward",
           "forward_embeddings", "head", "init_cache", "init_params", "lm_head", "param_bytes",
           "param_logical_axes", "param_shardings", "truncate"]
