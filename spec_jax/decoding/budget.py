"""`--budget auto`: size a tree drafter's template for this device (see `policies.budget`).

A calibration run with the drafter's largest template records how often each node is accepted
and how long drafting takes; together with the measured cost of verifying T tokens on this device
that gives the template size with the most expected tokens per second, and the template is pruned
to it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spec_jax.decoding.engine import Engine
from spec_jax.decoding.generate import generate
from spec_jax.errors import InvalidArgumentError
from spec_jax.policies.budget import choose_budget, measure_forward_cost, prune_template


def auto_budget(engine: Engine, params, calibration: list[list[int]], *, draft_params=None,
                max_new_tokens: int = 96, cost: dict[int, float] | None = None):
    """(engine with the pruned template, report, draft params after calibration).

    Drafters that learn while decoding (Token Recycling) come out of the calibration warm: the
    returned draft params carry what they learned.
    """
    drafter = engine.drafter
    if not hasattr(drafter, "with_template"):
        raise InvalidArgumentError(f"--budget auto needs a drafter with a static tree template; "
                                   f"{drafter.name} has none")
    hits, steps, draft_s, committed = np.zeros(drafter.num_nodes), 0, 0.0, 0
    for i, prompt in enumerate(calibration):  # one at a time: costs are measured for batch 1
        gen = generate(engine, params, [prompt], max_new_tokens, draft_params=draft_params, time_phases=True)
        draft_params = gen.draft_params
        if i == 0 and len(calibration) > 1:
            continue  # the first run compiles the step halves; its times are not representative
        hits += np.asarray(gen.node_hits)
        steps += gen.target_forwards[0] - 1
        committed += len(gen.token_ids[0]) - 1
        draft_s += gen.draft_seconds
    rates = hits / max(steps, 1)
    cost = cost or measure_forward_cost(params, engine.cfg, sizes=_sizes(drafter.num_nodes + 1))
    n, curve = choose_budget(rates, cost, draft_s / max(steps, 1))
    template = prune_template(drafter.template, rates, n)
    report = {"nodes": template.num_nodes, "depth": template.max_depth, "of_nodes": drafter.num_nodes,
              "expected_tau": next(c["expected_tau"] for c in curve if c["nodes"] == n),
              "calibration_tau": committed / max(steps, 1), "draft_seconds_per_step": draft_s / max(steps, 1),
              "cost_seconds": cost, "curve": curve}
    return dataclasses.replace(engine, drafter=drafter.with_template(template)), report, draft_params


def _sizes(max_tokens: int) -> tuple[int, ...]:
    """Token counts at which to measure the forward cost (interpolated in between)."""
    base = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128]
    return tuple(sorted({t for t in base if t < max_tokens} | {max_tokens}))
