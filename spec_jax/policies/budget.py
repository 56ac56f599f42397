"""Hardware-aware draft budgets (`--budget auto`): pick the tree size that maximises tokens/second.

Two measurements meet here:

- cost(T): seconds for one target forward over T new tokens (tree-shaped, against a filled cache)
  on the current device, measured once per device and model and cached on disk. On a GPU cost is
  nearly flat up to dozens of tokens; on a 2-core CPU an 80-token forward costs several one-token steps.
- rates[i]: how often node i of the drafter's largest template lies on the accepted path. Under
  greedy verification a node is accepted exactly when its own path matches the target, whatever
  else the tree holds, so a sub-tree S of the template commits 1 + sum_{i in S} rates[i] tokens per
  step in expectation, and costs one forward over |S| + 1 tokens (plus the drafter's own time).

The best budget n maximises (1 + sum of the n largest rates) / (cost(n + 1) + draft_seconds); the
n largest rates form a tree because a child is never accepted more often than its parent.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.errors import InvalidArgumentError
from spec_jax.files import atomic_write_text, cache_root
from spec_jax.models import Config, forward, init_cache
from spec_jax.trees import TreeTemplate, ancestor_mask


def _cache_file(cfg: Config, params, mesh) -> Path:
    root = cache_root()
    dev = jax.devices()[0]
    shapes = str(sorted((jax.tree_util.keystr(k), v.shape, str(v.dtype))
                        for k, v in jax.tree_util.tree_leaves_with_path(params)))
    layout = dict(mesh.shape) if mesh is not None else None
    key = hashlib.sha256(f"{cfg}{shapes}{layout}{jax.__version__}".encode()).hexdigest()[:16]  # XLA changes costs
    return root / "budget" / f"{dev.platform}-{dev.device_kind.replace(' ', '_')}-{jax.device_count()}-{key}.json"


def measure_forward_cost(params, cfg: Config, sizes=(1, 2, 4, 8, 16, 24, 32, 48, 64, 80), *, context: int = 256,
                         repeats: int = 5, use_cache: bool = True, mesh=None) -> dict[int, float]:
    """Median seconds of a target forward over T tree tokens after `context` committed tokens, per T (params
    as placed: sharded on `mesh` when given, which keys the cached measurement too)."""
    path = _cache_file(cfg, params, mesh)
    if use_cache and path.is_file():
        cached = {int(k): v for k, v in json.loads(path.read_text())["cost"].items()}
        if all(t in cached for t in sizes):
            return {t: cached[t] for t in sizes}
    size = context + max(sizes) + 8
    cache = init_cache(cfg, 1, size).replace(lengths=jnp.array([context], jnp.int32))
    fwd = jax.jit(lambda p, tok, pos, c, m: forward(p, cfg, tok, pos, c, m).logits, static_argnums=())
    out = {}
    for t in sizes:
        tmpl = TreeTemplate.from_level_sizes(_levels_for(t), width=8) if t > 1 else None
        mask = jnp.asarray(ancestor_mask(tmpl.parents) if tmpl else np.ones((1, 1), bool))[None]
        tok = jnp.zeros((1, t), jnp.int32)
        pos = jnp.full((1, t), context, jnp.int32)
        jax.block_until_ready(fwd(params, tok, pos, cache, mask))  # compile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, tok, pos, cache, mask))
            times.append(time.perf_counter() - t0)
        out[t] = float(np.median(times))
    # A smaller tree can always be padded to a larger one, so cost is non-decreasing in T: take the
    # cheapest measurement at or above each size (removes timing noise that would favour odd sizes).
    out = {t: min(v for u, v in out.items() if u >= t) for t in out}
    if use_cache:
        atomic_write_text(path, json.dumps({"device": str(jax.devices()[0]), "cost": out}, indent=1))
    return out


def _levels_for(t: int) -> tuple[int, ...]:
    """Level sizes of a tree of exactly t nodes, levels at most 8 wide."""
    n, levels = t, []
    while n > 0:
        levels.append(min(8, n))
        n -= levels[-1]
    return tuple(levels) if levels else (1,)


def interpolate_cost(cost: dict[int, float], t: int) -> float:
    ts = sorted(cost)
    return float(np.interp(t, ts, [cost[x] for x in ts]))


def choose_budget(rates: np.ndarray, cost: dict[int, float], draft_seconds: float = 0.0,
                  min_nodes: int = 1) -> tuple[int, list[dict]]:
    """The number of nodes maximising expected tokens per second, and the curve it was chosen on."""
    rates = np.sort(np.asarray(rates, np.float64))[::-1]
    if len(rates) == 0:
        raise InvalidArgumentError("no acceptance statistics to choose a budget from")
    curve = []
    for n in range(min_nodes, len(rates) + 1):
        tokens = 1.0 + rates[:n].sum()
        seconds = interpolate_cost(cost, n + 1) + draft_seconds
        curve.append({"nodes": n, "expected_tau": tokens, "tokens_per_second": tokens / seconds})
    best = max(curve, key=lambda c: c["tokens_per_second"])
    return best["nodes"], curve


def prune_template(template: TreeTemplate, rates: np.ndarray, n: int) -> TreeTemplate:
    """The n nodes of `template` with the highest acceptance rates (ancestor-closed)."""
    order = sorted(range(template.num_nodes), key=lambda i: (-rates[i], len(template.paths[i]), i))
    keep = set()
    for i in order:
        if len(keep) == n:
            break
        path = template.paths[i]
        need = {path[:d] for d in range(1, len(path) + 1)} - keep
        if len(keep) + len(need) <= n:
            keep |= need
    return TreeTemplate(tuple(keep))
