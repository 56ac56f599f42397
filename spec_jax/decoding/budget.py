"""`--budget auto`: size a tree drafter's tree for this device (see `policies.budget`).

A calibration run with the drafter's largest tree records how often each node slot is accepted
and how long drafting takes; together with the measured cost of verifying T tokens on this device
that gives the tree size with the most expected tokens per second, and the drafter is pruned to it
(`Drafter.pruned`: a static template keeps its most accepted nodes, a dynamic tree its budget).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from spec_jax.decoding.engine import Engine
from spec_jax.decoding.generate import generate
from spec_jax.errors import InvalidArgumentError
from spec_jax.metrics import tau
from spec_jax.policies.budget import choose_budget, measure_forward_cost


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


def apply_budget(engine: Engine, budget, params, *, weights=None, carry=None, calibration=None):
    """`--budget N|auto` for drafters with a prunable static tree: (engine, carry, report or None).

    A fixed N keeps the N nodes of the template that its own rank prior ranks first; 'auto' measures
    (see `auto_budget`) on the `calibration` prompts.
    """
    budget = parse_budget(budget)
    if budget is None:
        return engine, carry, None
    drafter = engine.drafter
    if not drafter.prunable:
        raise InvalidArgumentError(f"--budget applies to methods with a prunable tree; {drafter.name} has "
                                   "none (`spec-jax methods` describes each method)")
    drafter.pruned(drafter.shape.nodes)  # refuses a tree it cannot prune before any calibration
    if budget == "auto":
        engine, report, carry = auto_budget(engine, params, calibration, weights=weights, carry=carry)
        return engine, carry, report
    if budget > drafter.shape.nodes:
        raise InvalidArgumentError(f"--budget {budget} must be between 1 and the tree's {drafter.shape.nodes} nodes")
    return dataclasses.replace(engine, drafter=drafter.pruned(budget)), carry, {"nodes": budget}


def auto_budget(engine: Engine, params, calibration: list[list[int]], *, weights=None, carry=None,
                max_new_tokens: int = 96, cost: dict[int, float] | None = None):
    """(engine with the pruned template, report, carry after calibration).

    Drafters that learn while decoding (Token Recycling) come out of the calibration warm: the
    returned carry holds what they learned.
    """
    if jax.process_count() > 1:
        raise InvalidArgumentError("--budget auto times this host alone, and the hosts of a multi-host run must "
                                   "agree on one tree: pass a fixed --budget N (e.g. the one a single-host run chose)")
    drafter = engine.drafter
    N = drafter.shape.nodes
    hits, steps, draft_s, new, forwards, runs = np.zeros(N), 0, 0.0, 0, 0, 0
    for i, prompt in enumerate(calibration):  # one at a time: costs are measured for batch 1
        gen = generate(engine, params, [prompt], max_new_tokens, weights=weights, carry=carry, time_phases=True)
        carry = gen.carry
        if i == 0 and len(calibration) > 1:
            continue  # the first run compiles the step halves; its times are not representative
        hits += np.asarray(gen.node_hits)
        steps += gen.target_forwards[0] - 1
        new, forwards, runs = new + gen.new_tokens, forwards + gen.target_forwards[0], runs + 1
        draft_s += gen.draft_seconds
    rates = hits / max(steps, 1)
    cost = cost or measure_forward_cost(params, engine.cfg, sizes=_sizes(N + 1), mesh=engine.mesh)
    n, curve = choose_budget(rates, cost, draft_s / max(steps, 1))
    pruned = drafter.pruned(n, rates)
    report = {"nodes": pruned.shape.nodes, "depth": pruned.shape.depth, "of_nodes": N,
              "expected_tau": next(c["expected_tau"] for c in curve if c["nodes"] == n),
              "calibration_tau": tau(new, forwards, runs), "draft_seconds_per_step": draft_s / max(steps, 1),
              "cost_seconds": cost, "curve": curve}
    return dataclasses.replace(engine, drafter=pruned), report, carry


def _sizes(max_tokens: int) -> tuple[int, ...]:
    """Token counts at which to measure the forward cost (interpolated in between)."""
    base = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128]
    return tuple(sorted({t for t in base if t < max_tokens} | {max_tokens}))
