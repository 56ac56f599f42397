"""Host-side generation API: pad prompts, check the drafter, prefill, run the on-device loop, collect statistics."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from spec_jax.decoding.engine import DecodeState, Engine, audit_drafter
from spec_jax.metrics import tau
from spec_jax.sharding import fetch


@dataclasses.dataclass
class Generation:
    """Generated tokens and the run's statistics."""

    token_ids: list[list[int]]
    seconds: float  # wall time from call to last token (prefill included, compile included if cold)
    prefill_seconds: float  # time to the first token
    target_forwards: list[int]  # per sequence, prefill included
    accepted: list[int]  # accepted draft tokens per sequence
    reached: list[int]  # per depth: verified nodes whose parent was accepted
    accepted_at: list[int]  # per depth: of those, accepted
    node_hits: list[int] = dataclasses.field(default_factory=list)  # per tree node: times on the accepted path
    draft_seconds: float | None = None  # time in the drafting halves of the steps (phase-timed runs)
    verify_seconds: float | None = None  # time in the verifying halves (target forward, verify, commit)
    host_seconds: float = 0.0  # time host drafters spent in host code (inside the draft phase)
    carry: Any = None  # what the drafter hands the next request (`Drafter.carry_out`: a hot start)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tau(self) -> float:
        """Tokens committed per target forward in the decode phase, bonus token counted (AR = 1.0)."""
        return tau(self.new_tokens, sum(self.target_forwards), len(self.token_ids))

    @property
    def acceptance_by_depth(self) -> list[float]:
        return [a / r if r else float("nan") for a, r in zip(self.accepted_at, self.reached, strict=True)]

    def stats(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "target_forwards": int(sum(self.target_forwards)),
            "tau": round(self.tau, 4),
            "accepted_drafts": int(sum(self.accepted)),
            "acceptance_by_depth": [round(a, 4) if a == a else None for a in self.acceptance_by_depth],
            "draft_seconds": None if self.draft_seconds is None else round(self.draft_seconds, 4),
            "verify_seconds": None if self.verify_seconds is None else round(self.verify_seconds, 4),
            "host_seconds": round(self.host_seconds, 4),
        }


def generate(engine: Engine, params, prompts: list[list[int]], max_new_tokens: int, *, seed: int = 0,
             weights=None, carry=None, cache_size: int | None = None,
             stream: Callable[[list[list[int]]], None] | None = None, chunk_steps: int = 16,
             time_phases: bool = False) -> Generation:
    """Generate up to `max_new_tokens` for each prompt with the engine's drafter and sampling.

    `weights` are the drafter's trained weights, `carry` what a previous request left it (see
    `drafters.base`). With `stream`, the device loop runs `chunk_steps` steps at a time and `stream`
    receives the tokens generated so far after each chunk; otherwise the whole loop is one device call.
    With `engine.mesh`, params and weights are expected on that mesh (`load_model(..., mesh=)`,
    `init_params(..., mesh=)`); the decode state is born sharded in prefill and every jitted call has
    explicit in/out shardings. With `time_phases`, the loop runs from the host one step at a time,
    drafting and verifying as separate device calls, and the result reports the time spent in each
    (`draft_seconds`, `verify_seconds`); the host round trips make such a run slightly slower.
    """
    padded, lens = engine.pad_prompts(prompts)
    size = cache_size or engine.cache_size(int(lens.max()), max_new_tokens)
    engine.check(lens.tolist(), max_new_tokens, size)
    audit_drafter(engine, params, weights, carry)
    host0 = engine.drafter.host_seconds()
    t0 = time.perf_counter()
    state: DecodeState = engine.prefill(params, weights, carry, padded, lens, max_new_tokens, seed, size)
    jax.block_until_ready(state.tokens_BxS)
    t_first = time.perf_counter() - t0
    if stream is not None:
        stream(engine.outputs(state))
    draft_s = verify_s = None
    if time_phases:
        state, draft_s, verify_s = _run_phases(engine, params, weights, state, stream, chunk_steps)
    else:
        limit = 0
        while not engine.all_done(state):
            limit = limit + chunk_steps if stream is not None else np.iinfo(np.int32).max
            state = engine.run(params, weights, state, limit)
            if stream is not None:
                stream(engine.outputs(state))
    jax.block_until_ready(state.tokens_BxS)
    seconds = time.perf_counter() - t0
    counters = fetch(state.counters(), engine.mesh)
    return Generation(
        token_ids=engine.outputs(state), seconds=seconds, prefill_seconds=t_first,
        target_forwards=counters["forwards"].tolist(), accepted=counters["accepted"].tolist(),
        reached=counters["reached"].tolist(), accepted_at=counters["accepted_at"].tolist(),
        node_hits=counters["node_hits"].tolist(), draft_seconds=draft_s, verify_seconds=verify_s,
        host_seconds=engine.drafter.host_seconds() - host0, carry=engine.drafter.carry_out(state.drafter))


def _run_phases(engine: Engine, params, weights, state: DecodeState, stream, chunk_steps: int):
    """Step from the host, timing the drafting and the verifying half of every step."""
    draft_s = verify_s = 0.0
    steps = 0
    while not engine.all_done(state):
        t0 = time.perf_counter()
        proposal = jax.block_until_ready(engine.draft_phase(params, weights, state))
        t1 = time.perf_counter()
        state = jax.block_until_ready(engine.verify_phase(params, weights, state, proposal))
        draft_s += t1 - t0
        verify_s += time.perf_counter() - t1
        steps += 1
        if stream is not None and steps % chunk_steps == 0:
            stream(engine.outputs(state))
    if stream is not None:
        stream(engine.outputs(state))
    return state, draft_s, verify_s
