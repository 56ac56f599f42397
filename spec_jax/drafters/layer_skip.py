"""`layer_skip`: self-speculative decoding by skipping target layers (Draft & Verify, Zhang et al.
2024; SWIFT, Xia et al. 2024).

The target itself drafts with a static subset of its layers, writing K/V of the layers it runs
into the target cache's scratch region; verification then overwrites those slots for all layers.
`search_skip_set` picks the layers to skip on calibration text and `save_skip_set` /
`load_skip_set` keep the choice in a JSON file for `--method layer_skip`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters.base import DraftShape, StepContext
from spec_jax.drafters.chain import LENGTH_POLICY, ChainDrafter, draft_chain
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.files import atomic_write_text
from spec_jax.models import Config, forward, init_cache, param_bytes
from spec_jax.policies import FixedLength, LengthPolicy, make_policy


@dataclasses.dataclass(frozen=True)
class LayerSkip(ChainDrafter):
    skip: tuple[int, ...] = ()
    policy: LengthPolicy = FixedLength(4)
    name = "layer_skip"

    @property
    def shape(self) -> DraftShape:
        # The chain's first K - 1 drafts and the pending token are fed through the kept layers, leaving
        # their K/V in the target cache's scratch slots (verification overwrites them).
        return DraftShape(nodes=self.policy.k, depth=self.policy.k, target_scratch=self.policy.k)

    def check(self, cfg: Config, weights, carry) -> None:
        bad = [i for i in self.skip if not 0 <= i < cfg.num_layers]
        if bad or len(set(self.skip)) >= cfg.num_layers:
            raise InvalidArgumentError(
                f"skip set {list(self.skip)} is invalid for a {cfg.num_layers}-layer model: layers "
                "must be distinct indices in range, and at least one layer must remain")

    def kept_layers(self, cfg: Config) -> tuple[int, ...]:
        return tuple(i for i in range(cfg.num_layers) if i not in set(self.skip))

    def init(self, weights, carry, cfg, batch, cache_size):
        return {"policy": self.policy.init(batch)}

    def propose(self, weights, state, ctx: StepContext):
        layers = self.kept_layers(ctx.cfg)

        def model_step(cache, tokens_BxT, positions_BxT):
            out = forward(ctx.target_params, ctx.cfg, tokens_BxT, positions_BxT,
                          cache.replace(lengths=positions_BxT[:, 0]), layers=layers,
                          logits_at=jnp.full((tokens_BxT.shape[0], 1), tokens_BxT.shape[1] - 1, jnp.int32))
            return out.logits[:, 0], out.cache.replace(lengths=ctx.committed_B)

        tree, cache = draft_chain(model_step, ctx.cache, ctx.pending_B[:, None], ctx.committed_B[:, None],
                                  self.policy, state["policy"], ctx.sampling, ctx.rng)
        return tree, state, cache


# ----------------------------------------------------------------------------- skip-set search

@functools.partial(jax.jit, static_argnums=1)
def _agreement(params, cfg: Config, tokens_BxT, mask_BxT, full_top1, gates_L) -> jax.Array:
    """Share of positions where the gated model's argmax equals the full model's (one compile for all sets)."""
    B, T = tokens_BxT.shape
    out = forward(params, cfg, tokens_BxT, jnp.broadcast_to(jnp.arange(T), (B, T)), init_cache(cfg, B, T),
                  layer_gates=gates_L)
    hit = (jnp.argmax(out.logits, -1) == full_top1) & mask_BxT
    return jnp.sum(hit) / jnp.sum(mask_BxT)


def search_skip_set(params, cfg: Config, calibration: list[list[int]], *, max_skip: int | None = None,
                    k: int = 4, candidates: int = 6, progress=None) -> dict:
    """Greedy skip-set search on calibration sequences (target outputs, teacher-forced).

    Layers are added to the skip set one at a time, each time the layer (among the `candidates`
    least important ones when skipped alone) whose removal keeps the draft's top-1 agreement with
    the full model highest (SWIFT's objective, searched greedily
    instead of by Bayesian optimisation). Each candidate set is scored by the speedup a chain of
    `k` drafts would give with acceptance rate a = agreement and draft cost r (the share of the
    weights a draft forward reads: the kept layers plus the LM head, which every draft pays):
    (1 - a^(k+1)) / (1 - a) tokens per (k * r + 1) full forwards, at the best k <= `k`; the best
    set and its k are returned. Skip sets are evaluated with traced layer gates, so the whole
    search compiles once.
    """
    L = cfg.num_layers
    max_skip = L - 1 if max_skip is None else max_skip
    T = max(len(c) for c in calibration)
    toks = np.zeros((len(calibration), T), np.int32)
    mask = np.zeros((len(calibration), T), bool)
    for i, c in enumerate(calibration):
        toks[i, : len(c)] = c
        mask[i, : len(c)] = True
    toks, mask = jnp.asarray(toks), jnp.asarray(mask)
    full = forward(params, cfg, toks, jnp.broadcast_to(jnp.arange(T), toks.shape), init_cache(cfg, len(calibration), T))
    top1 = jnp.argmax(full.logits, -1)

    def agreement(skipped) -> float:
        gates = np.ones((L,), bool)
        gates[list(skipped)] = False
        return float(_agreement(params, cfg, toks, mask, top1, jnp.asarray(gates)))

    layer_bytes = sum(param_bytes(v) for name, v in params.items() if name.startswith("layers_"))
    head_bytes = cfg.vocab_size * cfg.hidden_size * jnp.dtype(cfg.jnp_dtype).itemsize
    head_share = head_bytes / (layer_bytes + head_bytes)

    def best_k(a: float, kept: int) -> tuple[float, int]:
        a = min(a, 0.999999)
        r = head_share + (1 - head_share) * kept / L
        return max(((1 - a ** (j + 1)) / (1 - a) / (j * r + 1), j) for j in range(1, k + 1))

    skip: list[int] = []
    history = []
    # Single-layer importance, computed once, limits each greedy round to the most promising layers.
    alone = {}
    for layer in range(L):
        alone[layer] = agreement([layer])
        if progress:
            progress()
    while len(skip) < max_skip:
        trials = []
        pool = sorted((x for x in range(L) if x not in skip), key=lambda x: -alone[x])[:candidates]
        for layer in pool:
            trials.append((agreement(skip + [layer]), layer))
            if progress:
                progress()
        a, layer = max(trials)
        skip = sorted(skip + [layer])
        s, kk = best_k(a, L - len(skip))
        history.append({"skip": list(skip), "agreement": a, "predicted_speedup": s, "k": kk})
    # The best non-empty set; `beats_ar` says whether even it is predicted to be faster than AR
    # (small models have little layer redundancy: skipping one of SmolLM2-135M's 30 layers already
    # drops top-1 agreement to ~0.8).
    best = max(history, key=lambda h: h["predicted_speedup"])
    return {"skip": best["skip"], "agreement": best["agreement"], "predicted_speedup": best["predicted_speedup"],
            "beats_ar": best["predicted_speedup"] > 1.0, "k": best["k"], "num_layers": L, "history": history}


def save_skip_set(result: dict, path: str | os.PathLike, model: str) -> Path:
    """Write the search result as JSON (atomically)."""
    return atomic_write_text(path, json.dumps({"model": model, **result}, indent=2))


def load_skip_set(path: str | os.PathLike, cfg: Config) -> tuple[tuple[int, ...], int]:
    """Read a skip set and its draft length from a `save_skip_set` file, checking it fits the model."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such skip-set file; create one with `spec-jax search-skip`")
    try:
        data = json.loads(path.read_bytes())
        skip = tuple(_index(i) for i in data["skip"])
        k = _index(data.get("k", 4))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataFormatError(f"{path}: not a skip-set file ({e}); expected JSON with a 'skip' list of "
                              "layer indices") from None
    if data.get("num_layers", cfg.num_layers) != cfg.num_layers:
        raise DataFormatError(f"{path}: skip set is for a {data['num_layers']}-layer model, "
                              f"this model has {cfg.num_layers} layers")
    bad = [i for i in skip if not 0 <= i < cfg.num_layers]
    if bad:
        raise DataFormatError(f"{path}: layer {bad[0]} is outside this model's layers [0, {cfg.num_layers})")
    if len(set(skip)) != len(skip) or len(skip) >= cfg.num_layers:
        raise DataFormatError(f"{path}: the skip set must name distinct layers and keep at least one of the "
                              f"model's {cfg.num_layers}")
    if k < 1:
        raise DataFormatError(f"{path}: draft length k must be >= 1, got {k}")
    return skip, k


def _index(value) -> int:
    """A JSON integer (not a bool, not a fractional number)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _check(opts, cfg: Config) -> None:
    if not opts.skip_file:
        raise InvalidArgumentError("--method layer_skip needs --skip-file; create one with "
                                   "`spec-jax search-skip --out skip.json`")
    load_skip_set(opts.skip_file, cfg)


@register("layer_skip", "self-speculative: the target drafts with a searched subset of its layers "
          "(`spec-jax search-skip`)",
          options=(Option("skip_file", str, None, "skip-set JSON written by `spec-jax search-skip`", path="read"),
                   Option("draft_k", int, None, "maximum draft length (default: the k saved with the skip set)",
                          min=1),
                   LENGTH_POLICY), check=_check)
def build(opts, target) -> Built:
    skip, k = load_skip_set(opts.skip_file, target.cfg)
    return Built(LayerSkip(skip=skip, policy=make_policy(opts.length_policy, opts.draft_k or k)))
