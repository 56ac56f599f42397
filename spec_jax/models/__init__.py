"""Llama-family models: config, parameters, KV cache, forward, loading and the named registry."""

from spec_jax.models.llama import (
    Config,
    KVCache,
    Output,
    commit,
    forward,
    head,
    init_cache,
    init_params,
    param_bytes,
    param_logical_axes,
    truncate,
)

__all__ = ["Config", "KVCache", "Output", "commit", "forward", "head", "init_cache", "init_params",
           "param_bytes", "param_logical_axes", "truncate"]
