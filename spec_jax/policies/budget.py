"""Hardware-aware draft budgets (`--budget auto`): pick the tree size that maximises tokens/second.

Two measurements meet here:

- cost(T): seconds for one target forward over T new tokens (tree-shaped, against a filled cache)
  on the current device, measured once per device and model and cached on disk. On a GPU cost is
  nearly flat up to dozens of tokens; on a 2-core CPU an 80-token forward costs several one-token steps.
- rates[i]: how often node i of the drafter's largest template lies on the accepted path. Under
  greedy verification a node is accepted exactly when its own path matches the target, whatever
  else the tree holds, so a sub-tree S of the template commits 1 + sum_{i in S} rates[i] tokens per
  step in expectation, and costs one forward over |S| + 1 tokens plus the rest of the step (drafting,
  verification, the drafter's update: `overhead`, a + b * |S| seconds, fitted to measured steps). A
  drafter with state (Token Recycling's matrix) accepts less with a sub-tree than the large tree's rates
  say, so measured sub-trees also scale the rates (`scale` of `choose_budget`).

The best budget n maximises (1 + s(n) * sum of the n largest rates) / (cost(n + 1) + a + b * n); the
n largest rates form a tree because a child is never accepted more often than its parent.

Measurements are cached under `cache_root()/budget`, one JSON file per model, device and (for a
chosen budget) method: `cache_file` names them, `read_cache` and `write_cache` read and write them
(a damaged file is reported and measured again, never a crash).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.errors import InvalidArgumentError, OutputError, first_line
from spec_jax.files import atomic_write_text, cache_root
from spec_jax.models import Config, forward, init_cache
from spec_jax.trees import TreeTemplate, ancestor_mask


def cache_file(cfg: Config, params, mesh, prefix: str = "", extra: str = "") -> Path:
    """The cache file of a measurement for this model (config, parameter shapes, mesh layout), device kind and
    jax version (XLA changes costs); `extra` (hashed) keys what else it depends on, `prefix` names it."""
    dev = jax.devices()[0]
    shapes = str(sorted((jax.tree_util.keystr(k), v.shape, str(v.dtype))
                        for k, v in jax.tree_util.tree_leaves_with_path(params)))
    layout = dict(mesh.shape) if mesh is not None else None
    key = hashlib.sha256(f"{cfg}{shapes}{layout}{jax.__version__}".encode()).hexdigest()[:16]
    if extra:
        key += "-" + hashlib.sha256(extra.encode()).hexdigest()[:16]
    device = f"{dev.platform}-{dev.device_kind.replace(' ', '_')}-{jax.device_count()}"
    return cache_root() / "budget" / f"{prefix}{device}-{key}.json"


def read_cache(path: Path, what: str, parse: Callable[[dict], object]):
    """`parse(the file's JSON object)`, or None when the file is missing or damaged (a warning says which file
    and that `what` is measured again; `parse` raises KeyError, TypeError or ValueError on a bad entry)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return parse(data)
    except (OSError, KeyError, TypeError, ValueError) as e:  # JSON and UTF-8 errors are ValueErrors
        _warn(f"ignoring the damaged cache file {path} ({first_line(e)}); measuring the {what} again")
        return None


def write_cache(path: Path, data: dict, what: str) -> None:
    """Write a cache entry atomically; a failure (no space, no permission) is a warning: caching only saves time."""
    try:
        atomic_write_text(path, json.dumps(data, indent=1))
    except OutputError as e:
        _warn(f"could not cache the {what} ({e}); the next run measures it again")


def _warn(text: str) -> None:
    print(f"spec-jax: warning: {text}", file=sys.stderr, flush=True)


def measure_forward_cost(params, cfg: Config, sizes=(1, 2, 4, 8, 16, 24, 32, 48, 64, 80), *, context: int = 256,
                         repeats: int = 5, use_cache: bool = True, mesh=None, batch: int = 1,
                         on_size: Callable[[int, int], None] | None = None) -> dict[int, float]:
    """Median seconds of a target forward over T tree tokens in each of `batch` sequences after `context`
    committed tokens, per T (params as placed: sharded on `mesh` when given, which keys the cached measurement
    too, as does the batch). Sizes already in the cache are not measured again (the cache keeps every size
    measured so far); `on_size(done, to_measure)` is called after each size that is measured (a progress bar)."""
    path = cache_file(cfg, params, mesh, extra=f"batch={batch}" if batch > 1 else "")
    cached = (read_cache(path, "verification cost", _parse_cost) if use_cache else None) or {}
    missing = [t for t in sizes if t not in cached]
    if not missing:
        return {t: cached[t] for t in sizes}
    size = context + max(missing) + 8
    cache = init_cache(cfg, batch, size).replace(lengths=jnp.full((batch,), context, jnp.int32))
    fwd = jax.jit(lambda p, tok, pos, c, m: forward(p, cfg, tok, pos, c, m).logits, static_argnums=())
    out = dict(cached)
    for i, t in enumerate(missing):
        tmpl = TreeTemplate.from_level_sizes(_levels_for(t), width=8) if t > 1 else None
        mask = jnp.asarray(np.broadcast_to(ancestor_mask(tmpl.parents) if tmpl else np.ones((1, 1), bool),
                                           (batch, t, t)))
        tok = jnp.zeros((batch, t), jnp.int32)
        pos = jnp.full((batch, t), context, jnp.int32)
        jax.block_until_ready(fwd(params, tok, pos, cache, mask))  # compile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, tok, pos, cache, mask))
            times.append(time.perf_counter() - t0)
        out[t] = float(np.median(times))
        if on_size is not None:
            on_size(i + 1, len(missing))
    # A smaller tree can always be padded to a larger one, so cost is non-decreasing in T: take the
    # cheapest measurement at or above each size (removes timing noise that would favour odd sizes).
    out = {t: min(v for u, v in out.items() if u >= t) for t in sorted(out)}
    if use_cache:
        write_cache(path, {"device": str(jax.devices()[0]), "cost": out}, "verification cost")
    return {t: out[t] for t in sizes}


def _parse_cost(data: dict) -> dict[int, float]:
    cost = {int(k): float(v) for k, v in data["cost"].items()}
    if not all(np.isfinite(v) and v > 0 for v in cost.values()):
        raise ValueError("a cost that is not a positive number")
    return cost


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


def fit_overhead(step_seconds: dict[int, float], cost: dict[int, float]) -> tuple[float, float]:
    """(a, b): the seconds a step of an n-node tree takes beyond the target forward over n + 1 tokens, modelled
    as a + b * n and fitted (least squares, b >= 0) to measured step times by node count. One measurement
    is read as all per-token work (a = b: the drafter's update and verification scale with the tokens fed)."""
    ns = np.array(sorted(step_seconds), np.float64)
    extra = np.array([step_seconds[int(n)] - interpolate_cost(cost, int(n) + 1) for n in ns])
    if len(ns) == 1:
        b = max(float(extra[0]), 0.0) / (ns[0] + 1)
        return b, b
    b, a = np.polyfit(ns, extra, 1)
    if b < 0:  # timing noise; the extra work does not shrink as the tree grows
        return float(extra.mean()), 0.0
    return float(a), float(b)


def choose_budget(rates: np.ndarray, cost: dict[int, float], overhead: tuple[float, float] = (0.0, 0.0),
                  scale: dict[int, float] | None = None, min_nodes: int = 1) -> tuple[int, list[dict]]:
    """The number of nodes maximising expected tokens per second, and the curve it was chosen on.

    A step of n nodes takes cost(n + 1) + a + b * n seconds for `overhead` (a, b) (see `fit_overhead`) and
    commits 1 + s(n) * (sum of the n largest rates) tokens, where s interpolates `scale` {nodes: measured over
    predicted accepted tokens} (1 without it): a drafter whose state depends on its own tree (Token
    Recycling's matrix is refreshed at every node it verifies) accepts less with a smaller tree than the
    large tree's rates say.
    """
    rates = np.sort(np.asarray(rates, np.float64))[::-1]
    if len(rates) == 0:
        raise InvalidArgumentError("no acceptance statistics to choose a budget from")
    a, b = overhead
    at = sorted(scale or {})
    curve = []
    for n in range(min_nodes, len(rates) + 1):
        s = float(np.interp(n, at, [scale[m] for m in at])) if at else 1.0
        tokens = 1.0 + s * rates[:n].sum()
        seconds = max(interpolate_cost(cost, n + 1) + a + b * n, 1e-9)
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
