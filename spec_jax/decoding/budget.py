"""`--budget auto`: size a tree drafter's tree for this device, once per model, device and drafter.

Calibration decodes the calibration prompts with the drafter's largest tree from the state the run
itself starts from (its `carry`), carried from prompt to prompt as a run of requests carries it: the
first prompt warms the state (Token Recycling's matrix fills from zeros) and compiles, the next ones
count how often each node slot is accepted and time the steps.
With the measured cost of verifying T tokens on this device (`policies.budget`) that gives the
expected tokens per second of every sub-tree. The best one is then decoded and timed (a probe) on one
of those prompts again (greedy decoding writes the same text whatever the tree, so the two runs differ
only in the tree), two predictions are corrected from what it measured, and the choice made again, at
most `PROBES` times:

- the time a step takes beyond the target forward (drafting, verification, the drafter's update),
  which grows with the tree (`policies.budget.fit_overhead`);
- the tokens a sub-tree commits: a drafter whose state depends on its own tree may accept less with a
  small tree than the large tree's rates say (Token Recycling refreshes the matrix row of every node
  it verifies). On SmolLM2-135M the effect is small: a 2-node Token Recycling tree committed 0.97 of
  the predicted accepted tokens on the same text. Re-decoding the same text is what makes the
  comparison mean something: from one prompt to another, tau moves far more than that.

Why calibrate once rather than adapt the budget while decoding: a tree is a static shape of the jitted
step, so every size tried online would compile a program in the middle of the user's run (seconds
each on a CPU), and once pruned the run no longer sees how often the nodes outside its tree would be
accepted, so it would have to keep verifying the large tree it is trying to avoid. A calibration that
is measured once and cached costs nothing on later runs.

AR is decoded and timed in the same loop too, and when no sub-tree is expected to beat it (by `AR_MARGIN`)
the choice is no tree at all: the engine decodes as `--method ar` does (nodes 0 in the report). That happens on
this 2-core CPU at batch sizes above one, where verifying grows with batch x nodes while AR reads the weights
once for the whole batch. At a batch size above one every sequence of a calibration batch gets a different
prompt (the calling run supplies `batch` times as many calibration prompts, and batches do not share text where
the list allows), so the step times and the acceptance counted per sequence slot include the raggedness of a
real batch: a step costs the whole batch's forward however many of its sequences accept, and sequences that
finish early leave their slots idle until the last one is done.

The choice (node count, the per-slot rates the tree is pruned by) is cached on disk, keyed by the
model's files and shapes, the device kind, the jax version, the drafter's settings, its trained weights,
the sampling, the calibration itself and the batch size; a later run prunes from the cached rates and decodes nothing
before its own prompt. `--recalibrate` measures again. The decoding that follows starts from the
state the run was given, not from calibration's warmed copy, so a calibrating run and a cached run
decode alike.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np

from spec_jax.decoding.engine import Engine
from spec_jax.decoding.generate import Generation, generate
from spec_jax.drafters.base import Drafter
from spec_jax.drafters.head_checkpoints import weights_fingerprint
from spec_jax.errors import InvalidArgumentError
from spec_jax.policies.budget import (
    cache_file,
    choose_budget,
    fit_overhead,
    interpolate_cost,
    measure_forward_cost,
    read_cache,
    write_cache,
)

WARMUP_PROMPTS = 1  # calibration prompts that only warm the drafter's state (and compile the large tree)
RATE_PROMPTS = 3  # then prompts decoded with the large tree: acceptance per node slot, step time
PROBES = 2  # then sub-trees decoded and timed, to correct the model of step time and acceptance
CALIBRATION_TOKENS = 128  # new tokens per calibration prompt
# A tree is kept only when it is expected to beat AR by this fraction: its acceptance is measured on a few
# calibration prompts, and the user's text accepts more or less (on SmolLM2-135M at batch 4 a 1-node tree expected
# 2% over AR measured 0.91x AR on MT-Bench), while AR's speed does not depend on the text.
AR_MARGIN = 0.05
CALIBRATION_VERSION = 6  # in the cache key: bump when calibration changes what it measures


def parse_budget(text) -> int | str | None:
    """`--budget`: None (the drafter's own tree), 'auto', or a positive node count."""
    if text in (None, "", "none"):
        return None
    if str(text) == "auto":
        return "auto"
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"--budget takes a node count or 'auto', got {text!r}") from None
    if n < 1:
        raise InvalidArgumentError(f"--budget must be at least 1 node, got {n}")
    return n


def apply_budget(engine: Engine, budget, params, *, weights=None, carry=None, calibration=None, model_id=None,
                 recalibrate: bool = False, progress: bool = False, batch: int = 1) -> tuple[Engine, dict | None]:
    """`--budget N|auto` for drafters with a prunable static tree: (engine, report or None).

    A fixed N keeps the N nodes of the template that its own rank prior ranks first; 'auto' takes the
    choice cached for this model, device and drafter, else calibrates on the `calibration` prompts (see
    `auto_budget`); it may choose no tree (AR's drafter) where none is expected to beat AR.
    """
    budget = parse_budget(budget)
    if budget is None:
        return engine, None
    drafter = engine.drafter
    if not drafter.prunable:
        raise InvalidArgumentError(f"--budget applies to methods with a prunable tree; {drafter.name} has "
                                   "none (`spec-jax methods` describes each method)")
    drafter.pruned(drafter.shape.nodes)  # refuses a tree it cannot prune before any calibration
    if budget == "auto":
        return auto_budget(engine, params, calibration, weights=weights, carry=carry, model_id=model_id,
                           recalibrate=recalibrate, progress=progress, batch=batch)
    if budget > drafter.shape.nodes:
        raise InvalidArgumentError(f"--budget {budget} must be between 1 and the tree's {drafter.shape.nodes} nodes")
    return dataclasses.replace(engine, drafter=drafter.pruned(budget)), {"nodes": budget}


def auto_budget(engine: Engine, params, calibration: list[list[int]], *, weights=None, carry=None,
                max_new_tokens: int = CALIBRATION_TOKENS, cost: dict[int, float] | None = None, probes: int = PROBES,
                model_id=None, use_cache: bool = True, recalibrate: bool = False,
                progress: bool = False, batch: int = 1) -> tuple[Engine, dict]:
    """(engine with the pruned tree, or AR's drafter when no tree is chosen; report): the cached choice, else a
    calibration (then cached).

    `carry` is the drafter state the run starts from; calibration warms a copy of it. `cost` replaces the
    measured verification cost (tests: then `probes=0`, as measured steps would not match it); `model_id`
    names the target's files (`models.registry.model_fingerprint`), without which the cache tells models
    apart by shapes alone. `batch`: the number of sequences the run decodes at once, which the costs are
    measured at (a choice per batch size). `progress` shows progress bars on stderr.
    """
    if jax.process_count() > 1:
        raise InvalidArgumentError("--budget auto times this host alone, and the hosts of a multi-host run must "
                                   "agree on one tree: pass a fixed --budget N (e.g. the one a single-host run chose)")
    if not calibration:
        raise InvalidArgumentError("--budget auto needs calibration prompts")
    drafter = engine.drafter
    if batch < 1:
        raise InvalidArgumentError(f"--budget auto needs a batch size of at least 1, got {batch}")
    path = choice_file(engine, params, weights, calibration, max_new_tokens, cost, probes, model_id, batch)
    if use_cache and not recalibrate:
        cached = read_cache(path, f"{drafter.name} budget", lambda data: _parse_choice(data, drafter))
        if cached is not None:
            pruned, report = cached
            return dataclasses.replace(engine, drafter=pruned), {**report, "cached": True, "cache_file": str(path)}
    t0 = time.perf_counter()
    n, rates, report = calibrate(engine, params, calibration, weights=weights, carry=carry,
                                 max_new_tokens=max_new_tokens, cost=cost, probes=probes, progress=progress,
                                 batch=batch)
    report["calibration_seconds"] = time.perf_counter() - t0
    if use_cache:
        write_cache(path, {"method": drafter.name, "choice": n, "rates": rates.tolist(), "report": report},
                    f"{drafter.name} budget")
    return (dataclasses.replace(engine, drafter=_tree(drafter, n, rates)),
            {**report, "cached": False, "cache_file": str(path) if use_cache else None})


def calibrate(engine: Engine, params, prompts: list[list[int]], *, weights=None, carry=None,
              max_new_tokens: int = CALIBRATION_TOKENS, cost: dict[int, float] | None = None, probes: int = PROBES,
              progress: bool = False, batch: int = 1) -> tuple[int, np.ndarray, dict]:
    """(node count to prune to, 0 for no tree (AR), acceptance rate of every node slot of the drafter's tree,
    report); see the module docstring for the plan. Each calibration batch holds `batch` different prompts (the
    next slice of the list, wrapping round only when it runs out), so the rates are per sequence slot and loop
    step, idle slots of finished sequences included, and the forward costs and step times are those of the run's
    batch (verification grows with batch x nodes; on a compute-bound device a large batch leaves a tree little
    room). With `probes=0` the choice rests on the cost model alone, AR's step included (cost(1)); otherwise AR is
    decoded and timed like the trees."""
    from tqdm import tqdm

    drafter = engine.drafter
    N = drafter.shape.nodes
    if cost is None:
        cost = _forward_cost(engine, params, N, progress, batch)
    # batches of `batch` prompts, disjoint as far as the list allows (a drafter that learns, like Token Recycling,
    # would accept more on text it has already decoded)
    count = max(len(prompts) // batch, 2 if len(prompts) > 1 else 1)
    groups = [[prompts[(g * batch + j) % len(prompts)] for j in range(batch)] for g in range(count)]
    k = min(WARMUP_PROMPTS, count - 1)
    size = engine.cache_size(max(map(len, prompts)), max_new_tokens)
    bar = tqdm(total=(count + probes + (probes > 0)) * max_new_tokens,
               desc=f"budget auto: warming up {drafter.name}", unit="tok", disable=not progress, leave=False)

    def decode(eng: Engine, group: list[list[int]], state) -> Generation:
        done = [0]

        def stream(outs):
            longest = max(map(len, outs))
            bar.update(longest - done[0])
            done[0] = longest

        gen = generate(eng, params, group, max_new_tokens, weights=weights, carry=state, cache_size=size,
                       stream=stream if progress else None)
        bar.update(max_new_tokens - done[0])  # a run that ended early (end of sequence) still did its share
        return gen

    def compile_(eng: Engine) -> None:  # one step, so that no timed run includes compilation
        generate(eng, params, groups[0], 2, weights=weights, carry=carry, cache_size=size)

    with bar:
        for group in groups[:k]:
            carry = decode(engine, group, carry).carry
        bar.set_description(f"budget auto: acceptance of {drafter.name}'s {N}-node tree")
        compile_(engine)
        runs = []  # per batch: (hits per node slot per sequence, loop steps, the run)
        for group in groups[k:]:
            gen = decode(engine, group, carry)
            carry = gen.carry
            runs.append((np.asarray(gen.node_hits, np.float64) / batch, _loop_steps(gen), gen))
        steps = sum(r[1] for r in runs)
        rates = sum(r[0] for r in runs) / max(steps, 1)
        tau_N = 1 + sum(_slot_tokens(r[2], batch) for r in runs) / max(steps, 1)
        timed = {N: {"nodes": N, "step_seconds": sum(_decode_seconds(r[2]) for r in runs) / max(steps, 1),
                     "tau": tau_N, "scale": (tau_N - 1) / rates.sum() if rates.sum() > 0 else 1.0}}
        ar = 1.0 / interpolate_cost(cost, 1)  # the cost model's AR step (a one-token forward), without probes
        if probes > 0:  # AR decoded and timed in the same loop as the trees
            bar.set_description("budget auto: timing AR")
            plain = dataclasses.replace(engine, drafter=Drafter())
            compile_(plain)
            gen = decode(plain, groups[k], carry)  # AR ignores the carry; the same one keeps the compiled shapes
            if _loop_steps(gen) > 0:
                ar = gen.decode_tokens / batch / _decode_seconds(gen)  # tokens/s per sequence

        def fit() -> tuple[float, float]:  # with probes=0 the choice rests on the cost model alone
            return fit_overhead(_step_seconds(timed), cost) if probes > 0 else (0.0, 0.0)

        n, curve = _choose(rates, cost, timed, ar, fit())
        for i in range(probes):  # the best tree is timed even when AR leads: the estimate may sell it short
            tree = drafter.pruned(_best_tree(curve)["nodes"], rates)
            m = tree.shape.nodes
            if m in timed:
                break
            bar.set_description(f"budget auto: timing a {m}-node tree")
            probe = dataclasses.replace(engine, drafter=tree)
            compile_(probe)
            hits, steps_j, _ = runs[i % len(runs)]
            gen = decode(probe, groups[k + i % len(runs)], carry)  # the same text again (greedy)
            carry = gen.carry
            if _loop_steps(gen) > 0:
                predicted = (hits[np.argsort(-rates, kind="stable")[:m]] / max(steps_j, 1)).sum()
                measured = _slot_tokens(gen, batch) / _loop_steps(gen)
                timed[m] = {"nodes": m, "step_seconds": _decode_seconds(gen) / _loop_steps(gen),
                            "tau": 1 + measured, "scale": measured / predicted if predicted > 0 else 1.0}
            n, curve = _choose(rates, cost, timed, ar, fit())
        bar.total = bar.n  # probes that were not needed
    best, best_tree = next(c for c in curve if c["nodes"] == n), _best_tree(curve)
    tree = _tree(drafter, n, rates)
    report = {"nodes": tree.shape.nodes, "depth": tree.shape.depth, "of_nodes": N, "batch": batch,
              "expected_tau": best["expected_tau"], "expected_tokens_per_second": best["tokens_per_second"],
              "ar_tokens_per_second": ar, "ar_margin": AR_MARGIN, "pays": n > 0,
              "best_tree_nodes": best_tree["nodes"], "best_tree_tokens_per_second": best_tree["tokens_per_second"],
              "calibration_tau": timed[N]["tau"], "probes": [timed[m] for m in sorted(timed)],
              "overhead_seconds": list(fit()), "cost_seconds": cost,
              "curve": curve}
    return n, rates, report


def _tree(drafter, n: int, rates: np.ndarray | None):
    """The drafter pruned to n nodes; n = 0 is no tree at all (AR)."""
    return Drafter() if n == 0 else drafter.pruned(n, rates)


def _best_tree(curve: list[dict]) -> dict:
    return max((c for c in curve if c["nodes"] > 0), key=lambda c: c["tokens_per_second"])


def _loop_steps(gen: Generation) -> int:
    """Steps the decode loop ran after prefill (a batch steps until its last sequence is done)."""
    return max(gen.target_forwards) - 1


def _slot_tokens(gen: Generation, batch: int) -> float:
    """Accepted draft tokens per sequence slot: what a batch's steps committed beyond one token per step and slot
    (finished sequences' idle slots count as committing nothing, so raggedness lowers it)."""
    return gen.decode_tokens / batch - _loop_steps(gen)


def _decode_seconds(gen: Generation) -> float:
    return gen.seconds - gen.prefill_seconds


def _choose(rates: np.ndarray, cost: dict[int, float], timed: dict[int, dict], ar: float,
            overhead: tuple[float, float]) -> tuple[int, list[dict]]:
    """The best node count under the step cost (forward plus `overhead`) and acceptance corrected by the trees timed
    so far, 0 (no tree) when none is expected to beat AR's `ar` tokens/s by `AR_MARGIN`; the curve starts with AR at
    0 nodes."""
    n, curve = choose_budget(rates, cost, overhead, scale={m: t["scale"] for m, t in timed.items()})
    best = next(c for c in curve if c["nodes"] == n)
    return (n if best["tokens_per_second"] > ar * (1 + AR_MARGIN) else 0,
            [{"nodes": 0, "expected_tau": 1.0, "tokens_per_second": ar}, *curve])


def _step_seconds(timed: dict[int, dict]) -> dict[int, float]:
    return {m: t["step_seconds"] for m, t in timed.items()}


def _forward_cost(engine: Engine, params, nodes: int, progress: bool, batch: int = 1) -> dict[int, float]:
    """This device's cost of a target forward over 1 .. nodes + 1 tokens in each of `batch` sequences (cached per
    model, device and batch)."""
    from tqdm import tqdm

    sizes = _sizes(nodes + 1)
    bar = None

    def measured(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # only when sizes are measured, not read from the cache
            bar = tqdm(total=total, desc=f"budget auto: timing this device's forward over 1-{sizes[-1]} tokens"
                       + (f" x {batch} sequences" if batch > 1 else ""),
                       unit="size", disable=not progress, leave=False)
        bar.update(done - bar.n)

    try:
        return measure_forward_cost(params, engine.cfg, sizes=sizes, mesh=engine.mesh, batch=batch, on_size=measured)
    finally:
        if bar is not None:
            bar.close()


def _sizes(max_tokens: int) -> tuple[int, ...]:
    """Token counts at which to measure the forward cost (interpolated in between)."""
    base = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128]
    return tuple(sorted({t for t in base if t < max_tokens} | {max_tokens}))


# ----------------------------------------------------------------------------- the cached choice

def choice_file(engine: Engine, params, weights, calibration: list[list[int]], max_new_tokens: int,
                cost: dict[int, float] | None = None, probes: int = PROBES, model_id=None, batch: int = 1):
    """Where the `--budget auto` choice for this model, device, drafter (settings and weights), sampling,
    calibration and batch size is cached. The drafter's carried state (Token Recycling's matrix) is not part of the key:
    calibration warms whatever it starts from."""
    trained = weights_fingerprint(weights) if weights is not None else None
    key = json.dumps([CALIBRATION_VERSION, model_id, _settings(engine.drafter), _settings(engine.sampling),
                      engine.verify_mode, trained, calibration, max_new_tokens, sorted(cost.items()) if cost else None,
                      probes, batch])
    return cache_file(engine.cfg, params, engine.mesh, prefix=f"{engine.drafter.name}-", extra=key)


def _parse_choice(data: dict, drafter):
    """(pruned drafter, or AR's for a choice of 0 nodes; report) from a cache entry, or ValueError when it does not
    fit this drafter."""
    N = drafter.shape.nodes
    rates = np.asarray(data["rates"], np.float64)
    n = data["choice"]
    if rates.shape != (N,) or not np.all(np.isfinite(rates)) or not isinstance(n, int) or not 0 <= n <= N:
        raise ValueError(f"not a choice for a {N}-node tree")
    report = dict(data["report"])
    pruned = _tree(drafter, n, rates)
    if pruned.shape.nodes != report["nodes"]:
        raise ValueError(f"the cached tree has {report['nodes']} nodes, pruning gives {pruned.shape.nodes}")
    return pruned, report


def _settings(obj):
    """A drafter's (or any static dataclass's) settings as plain JSON values; other objects by their `fingerprint()`
    (e.g. the suffix automaton's static corpus), else by type."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [type(obj).__name__, {f.name: _settings(getattr(obj, f.name)) for f in dataclasses.fields(obj)}]
    if isinstance(obj, (list, tuple)):
        return [_settings(x) for x in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    fingerprint = getattr(obj, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else type(obj).__name__
