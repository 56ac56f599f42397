"""`spec-jax bench`: several methods and Hugging Face transformers on the same prompts, in one run.

Each method runs in its own worker process, so its peak resident memory is its own; the parent
collects per-prompt JSON lines and prints one table of tokens/s, tau, speedup over our AR, ratio
over HF transformers, output mismatches against AR (greedy), peak memory and the roofline.
Warm-up (one run per prompt-length bucket) and compile time are excluded from tokens/s and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HF_METHODS = ("hf_ar", "hf_pld")  # transformers generate: plain, and with prompt_lookup_num_tokens


def add_bench_args(p: argparse.ArgumentParser) -> None:
    from spec_jax.cli import METHODS, add_drafter_args, add_model_args

    add_model_args(p)
    p.add_argument("--config", help="YAML file of option defaults (configs/)")
    p.add_argument("--methods", default="ar,draft,hf_ar",
                   help=f"comma-separated: {', '.join(METHODS + HF_METHODS)}")
    p.add_argument("--dataset", default="mtbench", choices=["mtbench", "humaneval"])
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=256)
    add_drafter_args(p)
    p.add_argument("--out", default="results/bench", help="results folder")


# ----------------------------------------------------------------------------- measurement helpers

def memory_bandwidth_gbs(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Measured copy bandwidth in GB/s (read + write counted)."""
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _chat_prompts(tok, questions):
    from spec_jax.cli import encode_prompt

    return [encode_prompt(tok, q["turns"][0], chat=True) for q in questions]


# ----------------------------------------------------------------------------- workers

def _worker_ours(spec: dict) -> dict:
    from spec_jax.cli import _enable_compilation_cache, apply_budget, build_method
    from spec_jax.decoding import Engine, generate
    from spec_jax.models import param_bytes
    from spec_jax.models.registry import load_model, load_tokenizer

    _enable_compilation_cache()
    params, cfg = load_model(spec["model"], spec["dtype"])
    tok = load_tokenizer(spec["model"])
    args = argparse.Namespace(**spec["method_args"])
    drafter, dparams = build_method(args, params, cfg, tok)
    t = time.perf_counter()
    engine, dparams, budget = apply_budget(args, Engine(cfg, drafter), params, dparams, tok)
    budget_seconds = time.perf_counter() - t
    prompts = spec["prompts"]
    max_new = spec["max_new_tokens"]
    size = engine.cache_size(max(map(len, prompts)), max_new)
    t = time.perf_counter()
    seen = set()
    for p in prompts:  # warm-up: compile once per prompt-length bucket
        bucket = engine.pad_prompts([p])[0].shape[1]
        if bucket not in seen:
            seen.add(bucket)
            generate(engine, params, [p], max_new, draft_params=dparams, cache_size=size)
    warmup = time.perf_counter() - t
    rows = []
    carried = dparams  # drafters that learn while decoding (Token Recycling) carry state across prompts,
    for i, p in enumerate(prompts):  # starting from their initial params, not from the warm-up runs
        g = generate(engine, params, [p], max_new, draft_params=carried, cache_size=size)
        carried = g.draft_params
        rows.append({"index": i, "token_ids": g.token_ids[0], **g.stats()})
    # Where the time goes: the first prompt again, drafting and verification timed apart (after a
    # compile of the two halves); throughput above comes from the fused loop.
    generate(engine, params, [prompts[0]], 4, draft_params=dparams, cache_size=size, time_phases=True)
    g = generate(engine, params, [prompts[0]], max_new, draft_params=dparams, cache_size=size, time_phases=True)
    steps = sum(g.target_forwards) - 1
    phases = {"draft_ms_per_step": 1e3 * g.draft_seconds / steps, "verify_ms_per_step": 1e3 * g.verify_seconds / steps}
    return {"rows": rows, "warmup_seconds": warmup, "peak_rss_mb": peak_rss_mb(),
            "weight_bytes": param_bytes(params), "phases": phases, "budget": budget,
            "budget_seconds": budget_seconds}


def _worker_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from spec_jax.models.registry import resolve

    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve(spec["model"])
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent if kw else path, dtype=torch.float32, **kw)
    model.eval()
    prompts = spec["prompts"]
    max_new = spec["max_new_tokens"]
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False)
    warmup = time.perf_counter() - t
    rows = []
    for i, p in enumerate(prompts):
        with torch.no_grad():
            t = time.perf_counter()
            extra = {"prompt_lookup_num_tokens": 10} if spec["method"] == "hf_pld" else {}
            out = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=model.config.eos_token_id, **extra)
            sec = time.perf_counter() - t
        ids = out[0, len(p):].tolist()
        # transformers does not report target forwards for prompt lookup: tau is unknown there.
        ar = spec["method"] == "hf_ar"
        rows.append({"index": i, "token_ids": ids, "new_tokens": len(ids), "seconds": sec,
                     "tokens_per_second": len(ids) / sec, "tau": 1.0 if ar else None,
                     "target_forwards": len(ids) if ar else None})
    return {"rows": rows, "warmup_seconds": warmup, "peak_rss_mb": peak_rss_mb(), "weight_bytes": None}


def _run_worker(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = spec["out_file"]
    proc = subprocess.run([sys.executable, "-m", "spec_jax.bench.run", "--worker", f.name],
                          stdout=sys.stderr, stderr=sys.stderr)
    os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker for {spec['method']} failed (exit {proc.returncode})")
    return json.loads(Path(out).read_text())


# ----------------------------------------------------------------------------- driver

def parse_method(entry: str) -> tuple[str, dict]:
    """`name/option=value/...`: a method with its own settings, e.g. `token_recycling/budget=auto`."""
    from spec_jax.errors import InvalidArgumentError

    name, *opts = entry.split("/")
    overrides = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise InvalidArgumentError(f"method entry {entry!r}: expected name/option=value, got {opt!r}")
        overrides[key.replace("-", "_")] = int(value) if value.lstrip("-").isdigit() else value
    return name, overrides


def cmd_bench(args) -> int:
    from spec_jax.bench.datasets import humaneval, mtbench
    from spec_jax.models.registry import load_tokenizer

    questions = (mtbench() if args.dataset == "mtbench" else humaneval())[: args.num_prompts]
    tok = load_tokenizer(args.model)
    prompts = _chat_prompts(tok, questions)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = {}
    for m in methods:
        print(f"[bench] {m}: {len(prompts)} prompts x {args.max_new_tokens} new tokens", file=sys.stderr)
        name, overrides = parse_method(m)
        method_args = {**{k: v for k, v in vars(args).items() if k != "fn"}, **overrides, "method": name}
        spec = {"method": name, "model": args.model, "dtype": args.dtype, "prompts": prompts,
                "max_new_tokens": args.max_new_tokens, "method_args": method_args,
                "out_file": str(out_dir / f"{m.replace('/', '_')}.worker.json")}
        results[m] = _run_worker(spec)
        with open(out_dir / f"{m.replace('/', '_')}.jsonl", "w") as f:
            for row in results[m]["rows"]:
                f.write(json.dumps({"method": m, **row}) + "\n")
    report = summarise(results, memory_bandwidth_gbs())
    (out_dir / "summary.md").write_text(report + "\n")
    print(report)
    return 0


def summarise(results: dict, bandwidth_gbs: float) -> str:
    """Markdown table: tokens/s (total tokens / total time), tau, speedups, mismatches, memory."""
    def tps(m):
        rows = results[m]["rows"]
        return sum(r["new_tokens"] for r in rows) / sum(r["seconds"] for r in rows)

    ar = tps("ar") if "ar" in results else None
    hf = tps("hf_ar") if "hf_ar" in results else None
    weight_bytes = next((r["weight_bytes"] for r in results.values() if r["weight_bytes"]), None)
    ceiling = bandwidth_gbs * 1e9 / weight_bytes if weight_bytes else None
    ar_ids = [r["token_ids"] for r in results["ar"]["rows"]] if "ar" in results else None
    lines = ["| method | tokens/s | tau | speedup vs our AR | vs HF AR | x roofline | mismatches vs AR "
             "| draft ms/step | verify ms/step | warm-up s | peak RSS MB |", "|---" * 11 + "|"]
    for m, res in results.items():
        rows = res["rows"]
        known = all(r["target_forwards"] is not None for r in rows)
        forwards = sum(r["target_forwards"] - 1 for r in rows) if known else 0
        tau = f"{sum(r['new_tokens'] - 1 for r in rows) / forwards:.2f}" if forwards else ("1.00" if known else "-")
        mism = sum(r["token_ids"] != a for r, a in zip(rows, ar_ids, strict=True)) if ar_ids else "-"
        fmt = lambda x: f"{x:.2f}" if x else "-"
        ph = res.get("phases") or {}
        ms = {k: f"{ph[k]:.1f}" if k in ph else "-" for k in ("draft_ms_per_step", "verify_ms_per_step")}
        lines.append(f"| {m} | {tps(m):.1f} | {tau} | {fmt(ar and tps(m) / ar)} | {fmt(hf and tps(m) / hf)} "
                     f"| {fmt(ceiling and tps(m) / ceiling)} | {mism} | {ms['draft_ms_per_step']} "
                     f"| {ms['verify_ms_per_step']} | {res['warmup_seconds']:.1f} | {res['peak_rss_mb']:.0f} |")
    if weight_bytes:
        lines.append("")
        lines.append(f"Roofline: {weight_bytes / 1e6:.0f} MB of weights read per target forward at a "
                     f"measured {bandwidth_gbs:.1f} GB/s copy bandwidth -> AR ceiling "
                     f"{ceiling:.1f} tokens/s.")
    return "\n".join(lines)


def _worker_main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    fn = _worker_hf if spec["method"] in HF_METHODS else _worker_ours
    result = fn(spec)
    Path(spec["out_file"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit("usage: python -m spec_jax.bench.run --worker SPEC.json (use `spec-jax bench`)")
