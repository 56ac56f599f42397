"""Host-side generation API: pad prompts, check the drafter, prefill, run the on-device loop, collect statistics.

Compilation is timed apart from decoding: JAX reports the duration of every trace, lowering and XLA
compilation (or persistent-cache read) through `jax.monitoring`, and a run subtracts what was spent
on those inside each timed stretch, reporting the compilation next to them. (These events hold all
but ~1% of an ahead-of-time `lower().compile()`; what a cold run still pays is the first execution
of a fresh program: on the 2-core CPU, SmolLM2's first prefill takes 0.37 s, the next ones 0.11 s.)
"""

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
    prefill_seconds: float  # time to the first token (its compilation included if cold)
    compile_seconds: float  # tracing and compiling in this call (the drafter audit's probe included)
    first_token_seconds: float  # prefill without its compilation
    decode_seconds: float  # from the first token to the last, without compilation
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
        """New tokens over the whole wall time (prefill and any compilation included)."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decode_tokens(self) -> int:
        """Tokens after each sequence's first (which prefill makes)."""
        return self.new_tokens - len(self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Decoding speed after the first token, compilation excluded (None when nothing was decoded)."""
        return self.decode_tokens / self.decode_seconds if self.decode_tokens and self.decode_seconds > 0 else None

    @property
    def tau(self) -> float:
        """Tokens committed per target forward in the decode phase, bonus token counted (AR = 1.0)."""
        return tau(self.new_tokens, sum(self.target_forwards), len(self.token_ids))

    @property
    def acceptance_by_depth(self) -> list[float]:
        return [a / r if r else float("nan") for a, r in zip(self.accepted_at, self.reached, strict=True)]

    def stats(self) -> dict:
        rate = self.decode_tokens_per_second
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
            "compile_seconds": round(self.compile_seconds, 4),
            "first_token_seconds": round(self.first_token_seconds, 4),
            "decode_tokens": self.decode_tokens,
            "decode_seconds": round(self.decode_seconds, 4),
            "decode_tokens_per_second": None if rate is None else round(rate, 3),
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
    c_start = compile_clock()
    audit_drafter(engine, params, weights, carry)
    host0 = engine.drafter.host_seconds()
    t0, c0 = time.perf_counter(), compile_clock()
    state: DecodeState = engine.prefill(params, weights, carry, padded, lens, max_new_tokens, seed, size)
    jax.block_until_ready(state.tokens_BxS)
    t1, c1 = time.perf_counter(), compile_clock()
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
    t2, c2 = time.perf_counter(), compile_clock()
    counters = fetch(state.counters(), engine.mesh)
    return Generation(
        token_ids=engine.outputs(state), seconds=t2 - t0, prefill_seconds=t1 - t0, compile_seconds=c2 - c_start,
        first_token_seconds=max(t1 - t0 - (c1 - c0), 0.0), decode_seconds=max(t2 - t1 - (c2 - c1), 0.0),
        target_forwards=counters["forwards"].tolist(), accepted=counters["accepted"].tolist(),
        reached=counters["reached"].tolist(), accepted_at=counters["accepted_at"].tolist(),
        node_hits=counters["node_hits"].tolist(), draft_seconds=draft_s, verify_seconds=verify_s,
        host_seconds=engine.drafter.host_seconds() - host0, carry=engine.drafter.carry_out(state.drafter))


def _run_phases(engine: Engine, params, weights, state: DecodeState, stream, chunk_steps: int):
    """Step from the host, timing the drafting and the verifying half of every step (compilation excluded)."""
    draft_s = verify_s = 0.0
    steps = 0
    while not engine.all_done(state):
        t0, c0 = time.perf_counter(), compile_clock()
        proposal = jax.block_until_ready(engine.draft_phase(params, weights, state))
        t1, c1 = time.perf_counter(), compile_clock()
        state = jax.block_until_ready(engine.verify_phase(params, weights, state, proposal))
        draft_s += t1 - t0 - (c1 - c0)
        verify_s += time.perf_counter() - t1 - (compile_clock() - c1)
        steps += 1
        if stream is not None and steps % chunk_steps == 0:
            stream(engine.outputs(state))
    if stream is not None:
        stream(engine.outputs(state))
    return state, draft_s, verify_s


# What JAX reports (`jax.monitoring`) for the work of a call that compiles: tracing to a jaxpr, lowering to
# MLIR, and XLA's compilation or a read from the persistent compilation cache.
_COMPILE_EVENTS = frozenset(("/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"))
_compile_clock = {"seconds": 0.0, "listening": False}


def _on_duration(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_clock["seconds"] += seconds


def compile_clock() -> float:
    """Seconds this process has spent tracing and compiling since the clock was first read (monotonic)."""
    if not _compile_clock["listening"]:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _compile_clock["listening"] = True
    return _compile_clock["seconds"]
