"""Where an autoregressive decode step's milliseconds go, against the machine's rooflines.

On the real model (default: the embedded SmolLM2-135M), in one process:

- the copy bandwidth (`bench.report.memory_bandwidth_gbs`) and the roofline it sets: weight bytes read
  once per token;
- this CPU's matmul throughput (a large jitted `jnp.dot` and `np.dot`, GFLOP/s);
- AR decode time per step through the engine's fused on-device loop, with the KV cache filled by a
  prompt of each `--contexts` length (the cache sized as `spec-jax generate` sizes it);
- a breakdown of one step, each piece jitted and timed alone at the same context: the layers' weight
  GEMVs (all 30 layers' projections, nothing else), attention over the cache (write, scores, softmax,
  values; all layers), the LM head, greedy sampling, the whole one-token forward, and the loop's
  remainder (loop step minus forward);
- prefill of one ~800-token prompt (MT-Bench questions, chat-templated off), ours against transformers'
  forward on the same token ids (torch CPU fp32), both as seconds and GFLOP/s.

The step is also traced with `jax.profiler` (16 steps of the fused loop) and every XLA thunk in the trace
is attributed, through the compiled HLO, to weight GEMVs, attention, LM head, norms and elementwise,
sampling, or the loop's other work (`--trace DIR` keeps the traces for Perfetto / TensorBoard;
`XLA_FLAGS=--xla_dump_to=DIR` dumps the HLO). Prints tables and writes JSON (`--out`).

    python scripts/profile_ar.py --out results/profile_ar.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def best_seconds(fn, *args, repeats: int = 7, number: int = 1) -> float:
    """Median of `repeats` timings of `number` calls (after one warm-up call), per call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / number)
    return statistics.median(times)


def matmul_gflops(n: int = 2048) -> dict:
    """This CPU's fp32 matmul throughput: jitted jnp.dot and np.dot of two n x n matrices."""
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), np.float32)
    flops = 2 * n ** 3
    dot = jax.jit(jnp.dot)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    return {"n": n, "jax_gflops": flops / best_seconds(dot, ja, jb, repeats=5) / 1e9,
            "numpy_gflops": flops / best_seconds(np.dot, a, b, repeats=5) / 1e9}


def prompt_tokens(tok, n: int) -> list[int]:
    """About `n` tokens of English: MT-Bench first turns joined until the length is reached, then cut."""
    from spec_jax.bench.datasets import mtbench

    ids: list[int] = []
    for q in mtbench():
        ids += tok.encode(q["turns"][0] + "\n\n", add_special_tokens=False)
        if len(ids) >= n:
            break
    while len(ids) < n:
        ids += ids
    return ids[:n]


# ----------------------------------------------------------------------------- decode

def decode_ms_per_step(engine, params, prompt: list[int], steps: int, repeats: int = 3) -> dict:
    """Per-step time of the fused AR loop after a prefill of `prompt` (compile excluded)."""
    padded, lens = engine.pad_prompts([prompt])
    max_new = steps + 8
    size = engine.cache_size(int(lens.max()), max_new)
    times = []
    for r in range(repeats + 1):
        state = engine.prefill(params, None, None, padded, lens, max_new, 0, size)
        jax.block_until_ready(state.tokens_BxS)
        t = time.perf_counter()
        state = engine.run(params, None, state, steps)
        jax.block_until_ready(state.tokens_BxS)
        sec = time.perf_counter() - t
        done = int(jax.device_get(state.steps))
        if r:  # the first run compiles
            times.append(sec / done)
    return {"cache_size": size, "steps": done, "ms_per_step": 1e3 * statistics.median(times),
            "ms_per_step_min": 1e3 * min(times)}


# ----------------------------------------------------------------------------- the pieces of one step

def filled_cache(engine, params, prompt: list[int], size: int):
    """The KV cache after prefilling `prompt`, in a cache of `size` slots."""
    padded, lens = engine.pad_prompts([prompt])
    state = engine.prefill(params, None, None, padded, lens, 8, 0, size)
    return state.cache


def weight_matmuls(layers: list, x):
    """Every projection of every layer, chained through the residual (nothing else of the layer), for x [B, T, E]."""
    for p in layers:
        a, m = p["self_attn"], p["mlp"]
        q = x @ a["q_proj"]["kernel"]
        kv = (x @ a["k_proj"]["kernel"]) + (x @ a["v_proj"]["kernel"])
        x = x + q @ a["o_proj"]["kernel"] + jnp.sum(kv) * 1e-9
        h = jax.nn.silu(x @ m["gate_proj"]["kernel"]) * (x @ m["up_proj"]["kernel"])
        x = x + h @ m["down_proj"]["kernel"]
    return x


def breakdown(engine, params, cfg, cache) -> dict:
    """Milliseconds of each piece of a one-token decode step, each jitted and timed alone."""
    from spec_jax import sampling as sp
    from spec_jax.models import llama

    L, H, K, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x_1x1xE = jnp.ones((1, 1, cfg.hidden_size), jnp.float32) * 0.01
    token = jnp.zeros((1, 1), jnp.int32)
    pos = cache.lengths[:, None]
    layers = [params[f"layers_{i}"] for i in range(L)]

    gemvs = jax.jit(weight_matmuls)

    @jax.jit
    def attention(cache, x):
        # Every layer's `llama.attend` over the cache (projections and RoPE left out), chained. Not donated,
        # so each cache write here also copies the buffer: an upper bound; the trace gives the in-loop cost.
        mask = llama.attention_mask(cache.lengths, cache.size, None, 1)
        out = jnp.zeros((1, 1, H * D), jnp.float32)
        ks, vs = [], []
        for i in range(L):
            q = (x[..., : H * D] + out).reshape(1, 1, H, D)
            kv = x[..., : K * D].reshape(1, 1, K, D)  # one array as both new K and V: only the cost matters
            out, kc, vc = llama.attend(q, kv, kv, cache.k[i], cache.v[i], mask, cache.lengths)
            ks.append(kc)
            vs.append(vc)
        return out, cache.replace(k=tuple(ks), v=tuple(vs))

    h = x_1x1xE
    lm_head = jax.jit(lambda p, h: llama.lm_head(p, cfg, h))
    logits = lm_head(params, h)[:, 0]
    sample = jax.jit(lambda key, logits_BxV: sp.next_token(key, logits_BxV, engine.sampling))
    fwd = jax.jit(lambda p, c, t, q: llama.forward(p, cfg, t, q, c), donate_argnums=(1,))

    def fwd_timed(p, c, t, q):  # donated: keep the returned cache for the next call
        out = fwd(p, c, t, q)
        fwd_timed.cache = out.cache
        return out.logits

    fwd_timed.cache = cache
    res = {
        "weight_gemvs": best_seconds(gemvs, layers, x_1x1xE, number=5),
        "attention": best_seconds(lambda c, x: attention(c, x)[0], cache, x_1x1xE, number=5),
        "lm_head": best_seconds(lm_head, params, h, number=5),
        "sampling": best_seconds(sample, jax.random.key(0), logits, number=20),
    }
    res["forward"] = best_seconds(lambda t, q: fwd_timed(params, fwd_timed.cache, t, q), token, pos, number=5)
    return {k: 1e3 * v for k, v in res.items()}


# ----------------------------------------------------------------------------- per-op attribution of a trace

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_LAYER_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj",
                  "down_proj")


def hlo_categories(hlo_text: str, vocab: int, cache_size: int) -> dict[str, str]:
    """Category of every instruction of an optimised HLO module (the `hlo_op` names a trace reports).

    Dots: an output with the vocabulary as a dimension is the LM head; a dot over a cache-sized operand is
    attention; other dots are the layers' weight GEMVs. Everything else goes by the JAX source scope in
    its metadata: `self_attn` (RoPE, cache writes and relayouts, mask, softmax) is attention, norms, the
    MLP's activation and the residual adds are `norms_elementwise`, argmax / sampling is `sampling`, and
    the rest (the loop's token bookkeeping, counters, RNG) is `loop_other`.
    """
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m and line.rstrip().endswith("{"):
            current = m.group(1)
            comps[current] = []
        elif current is not None:
            comps[current].append(line)

    def dot_kind(lines) -> str | None:
        for ln in lines:
            m = _INSTR.match(ln)
            if m and m.group(3) in ("dot", "convolution"):
                dims = re.findall(r"\d+", m.group(2).split("[", 1)[-1])
                operands = re.findall(r"f32\[([\d,]*)\]", ln)
                if str(vocab) in dims:
                    return "lm_head"
                if any(str(cache_size) in o.split(",") for o in operands) or str(cache_size) in dims:
                    return "attention"
                return "weight_gemvs"
        return None

    out = {}
    for lines in comps.values():
        for ln in lines:
            m = _INSTR.match(ln)
            if not m:
                continue
            name, shape, opcode, rest = m.groups()
            scope = (re.search(r'op_name="([^"]*)"', rest) or [None, ""])[1]
            called = re.search(r"calls=%([\w.\-]+)", rest)
            kind = dot_kind([ln]) if opcode in ("dot", "convolution") else None
            if kind is None and opcode in ("fusion", "custom-call") and called:
                kind = dot_kind(comps.get(called.group(1), []))
            if kind is None:
                if "self_attn" in scope:
                    kind = "attention"
                elif any(f"/{w}/" in scope for w in _LAYER_WEIGHTS):
                    kind = "weight_gemvs"
                elif "argmax" in scope or "next_token" in scope or "sampling" in scope:
                    kind = "sampling"
                elif re.search(r"layernorm|/norm/|/mlp/|layers_\d+/add|logits", scope):
                    kind = "norms_elementwise"
                else:
                    kind = "loop_other"
            out[name] = kind
    return out


def trace_breakdown(trace_dir: str, module: str, categories: dict[str, str], steps: int) -> dict:
    """Milliseconds per step by category, summed over the leaf thunks of `module` in a jax.profiler trace."""
    files = sorted(Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz"))
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    totals: dict[str, float] = {}
    ops: dict[str, float] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or args.get("hlo_module") != module or "hlo_op" not in args:
            continue
        op = args["hlo_op"]
        if op.startswith(("while", "conditional", "call")):
            continue  # containers: their bodies' thunks are counted
        kind = categories.get(op, "loop_other")
        totals[kind] = totals.get(kind, 0.0) + e["dur"] / 1e3 / steps
        ops[op] = ops.get(op, 0.0) + e["dur"] / 1e3 / steps
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {"by_category_ms": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
            "top_ops_ms": {k: (v, categories.get(k, "?")) for k, v in top}}


def profile_loop(engine, params, prompt: list[int], steps: int, trace_dir: str) -> dict:
    """A jax.profiler trace of `steps` fused AR steps after prefilling `prompt`, attributed per category."""
    from spec_jax.decoding.engine import _jitted

    padded, lens = engine.pad_prompts([prompt])
    size = engine.cache_size(int(lens.max()), steps + 8)
    fresh = lambda: jax.block_until_ready(engine.prefill(params, None, None, padded, lens, steps + 8, 0, size))
    hlo = _jitted(engine, "loop", (), (2,), None).lower(params, None, fresh(), np.int32(steps)).compile().as_text()
    jax.block_until_ready(engine.run(params, None, fresh(), steps).tokens_BxS)
    state = fresh()
    t = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        state = engine.run(params, None, state, steps)
        jax.block_until_ready(state.tokens_BxS)
        wall = time.perf_counter() - t
    done = int(jax.device_get(state.steps))
    cats = hlo_categories(hlo, engine.cfg.vocab_size, size)
    res = trace_breakdown(trace_dir, "jit_loop", cats, done)
    res["traced_ms_per_step"] = 1e3 * wall / done
    return res


# ----------------------------------------------------------------------------- prefill

def prefill_ours(engine, params, prompt: list[int]) -> float:
    """Seconds of our prefill (the engine's jitted prefill, first token sampled), compile excluded."""
    padded, lens = engine.pad_prompts([prompt])
    size = engine.cache_size(int(lens.max()), 64)
    fn = lambda: engine.prefill(params, None, None, padded, lens, 64, 0, size).tokens_BxS
    return best_seconds(fn, repeats=3)


def prefill_hf(model_path: Path, prompt: list[int]) -> dict:
    """Seconds of transformers' forward over the prompt (what its `generate` runs first), torch CPU fp32."""
    import torch

    from spec_jax.bench.run import _hf_model

    model = _hf_model(model_path)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        sec = best_seconds(lambda: model(ids, use_cache=True).logits[:, -1], repeats=3)
    return {"seconds": sec, "threads": torch.get_num_threads()}


def forward_flops(cfg, t: int) -> float:
    """Matmul FLOPs of a t-token forward with logits at one position (projections, attention, one LM head row)."""
    E, M, H, K, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = 2 * t * (E * H * D + 2 * E * K * D + H * D * E + 3 * E * M) + 2 * 2 * H * D * t * t / 2
    return cfg.num_layers * per_layer + 2 * E * cfg.vocab_size


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="256,2048", help="prompt lengths that fill the cache before decoding")
    p.add_argument("--steps", type=int, default=48, help="decode steps timed per run")
    p.add_argument("--prefill-tokens", type=int, default=800)
    p.add_argument("--no-hf", action="store_true", help="skip transformers' prefill")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill comparison")
    p.add_argument("--trace", default=None,
                   help="keep the jax.profiler traces of decode steps here (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)

    from spec_jax.bench.report import memory_bandwidth_gbs
    from spec_jax.decoding.engine import Engine
    from spec_jax.models import param_bytes
    from spec_jax.models.registry import load_model, load_tokenizer, resolve

    params, cfg = load_model(args.model)
    tok = load_tokenizer(args.model)
    engine = Engine(cfg)
    weight_bytes = param_bytes(params)
    bw = memory_bandwidth_gbs()
    roof_ms = weight_bytes / (bw * 1e9) * 1e3
    report = {"model": args.model, "weight_bytes": weight_bytes, "bandwidth_gbs": bw, "roofline_ms": roof_ms,
              "roofline_tokens_per_second": 1e3 / roof_ms, "matmul": matmul_gflops(), "contexts": {}}
    print(f"weights {weight_bytes / 1e6:.0f} MB, copy bandwidth {bw:.1f} GB/s -> roofline {roof_ms:.2f} ms "
          f"({1e3 / roof_ms:.1f} tok/s); matmul: jax {report['matmul']['jax_gflops']:.0f} GFLOP/s, "
          f"numpy {report['matmul']['numpy_gflops']:.0f} GFLOP/s", flush=True)

    for ctx in map(int, args.contexts.split(",")):
        prompt = prompt_tokens(tok, ctx)
        dec = decode_ms_per_step(engine, params, prompt, args.steps)
        cache = filled_cache(engine, params, prompt, dec["cache_size"])
        parts = breakdown(engine, params, cfg, cache)
        parts["loop_remainder"] = dec["ms_per_step"] - parts["forward"]
        trace_dir = str(Path(args.trace or tempfile.mkdtemp(prefix="profile_ar_")) / f"context_{ctx}")
        prof = profile_loop(engine, params, prompt, 16, trace_dir)
        rec = {**dec, "tokens_per_second": 1e3 / dec["ms_per_step"], "x_roofline": roof_ms / dec["ms_per_step"],
               "pieces_alone_ms": parts, "trace": prof}
        report["contexts"][ctx] = rec
        print(f"\ncontext {ctx} (cache {dec['cache_size']} slots): {dec['ms_per_step']:.2f} ms/step "
              f"(min {dec['ms_per_step_min']:.2f}) = {rec['tokens_per_second']:.1f} tok/s = "
              f"{rec['x_roofline']:.2f} x roofline", flush=True)
        print("| piece timed alone | ms |\n|---|---|")
        for k, v in parts.items():
            print(f"| {k} | {v:.2f} |")
        print(f"\ntrace of 16 steps ({prof['traced_ms_per_step']:.2f} ms/step under the profiler), "
              "thunk time per step:\n| category | ms |\n|---|---|")
        for k, v in prof["by_category_ms"].items():
            print(f"| {k} | {v:.2f} |")
        print(f"| (sum) | {sum(prof['by_category_ms'].values()):.2f} |")
        print("top ops: " + ", ".join(f"{k} [{c}] {v:.2f}" for k, (v, c) in list(prof["top_ops_ms"].items())[:8]))
        sys.stdout.flush()

    if args.no_prefill:
        return finish(report, args.out)
    prompt = prompt_tokens(tok, args.prefill_tokens)
    ours = prefill_ours(engine, params, prompt)
    flops = forward_flops(cfg, len(prompt))
    report["prefill"] = {"tokens": len(prompt), "flops": flops, "ours_seconds": ours, "ours_gflops": flops / ours / 1e9}
    if not args.no_hf:
        hf = prefill_hf(resolve(args.model), prompt)
        report["prefill"].update(hf_seconds=hf["seconds"], hf_gflops=flops / hf["seconds"] / 1e9,
                                 hf_threads=hf["threads"])
    pf = report["prefill"]
    print(f"\nprefill {len(prompt)} tokens ({flops / 1e9:.1f} GFLOP): ours {ours:.3f} s "
          f"({pf['ours_gflops']:.0f} GFLOP/s)"
          + (f", transformers {pf['hf_seconds']:.3f} s ({pf['hf_gflops']:.0f} GFLOP/s)" if "hf_seconds" in pf else ""))

    return finish(report, args.out)


def finish(report: dict, out: str | None) -> int:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
