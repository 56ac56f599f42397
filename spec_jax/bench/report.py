"""Benchmark reports: the Markdown summary, PNG plots, and the record of what ran where.

Figures follow Spec-Bench: a method's speed is the mean over questions of per-question tokens/s;
speedup is that mean over AR's in the same run (per category and overall); tau is tokens committed
per target forward counting the bonus token; for greedy runs, mismatches count the questions whose
output differs from AR's in any turn. The roofline is the AR ceiling set by reading the weights once
per token at the measured memory bandwidth.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from spec_jax.files import atomic_write, atomic_write_text


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


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("spec-jax", "jax", "jaxlib", "flax", "optax", "numpy", "transformers", "torch", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Options that do not change a method's figures: a resumed run may differ in these.
_NOT_SETTINGS = ("fn", "out", "methods", "config", "fresh", "verbose")


def run_settings(args, questions: list[dict]) -> dict:
    """What a stored run must share with this one to be resumed: every option but the output folder and the
    method list, the questions (their ids, categories and text), the machine and the software versions."""
    import hashlib
    import os

    options = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    text = json.dumps([[q["question_id"], q["category"], q["turns"]] for q in questions], default=str)
    return json.loads(json.dumps({"options": options, "questions_sha256": hashlib.sha256(text.encode()).hexdigest(),
                                  "machine": {"cpu": _cpu(), "cores": os.cpu_count()}, "versions": _versions()},
                                 default=str))


def settings_differences(stored: dict, now: dict) -> list[str]:
    """`section key: stored -> now` for every setting that differs (empty when a run can be resumed)."""
    out = []
    for section in ("options", "machine", "versions"):
        old, new = stored.get(section, {}), now[section]
        out += [f"{section} {k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
    if stored.get("questions_sha256") != now["questions_sha256"]:
        out.append("the questions (their ids, categories or text)")
    return out


def write_run_info(out_dir: Path, args, methods: list[str], questions: list[dict], settings: dict,
                   previous: dict | None = None) -> None:
    """`run.json`: the command, its options, the questions, the machine and the software versions, and the
    `settings` a resumed run must match; `previous` is the run.json of the run being resumed."""
    import os

    now = time.strftime("%Y-%m-%d %H:%M:%S")
    info = {
        "command": " ".join(sys.argv),
        "started": previous["started"] if previous else now,
        **({"resumed": [*previous.get("resumed", []), now]} if previous else {}),
        "methods": methods,
        "options": {k: v for k, v in vars(args).items() if k != "fn"},
        "questions": [q["question_id"] for q in questions],
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "settings": settings,
    }
    atomic_write_text(out_dir / "run.json", json.dumps(info, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- figures

def mean_tps(rows: list[dict]) -> float:
    return float(np.mean([r["tokens_per_second"] for r in rows])) if rows else float("nan")


def speed(res: dict) -> float:
    """A method's tokens/s: at batch 1 the mean over questions of per-question tokens/s (Spec-Bench); at a
    larger batch the throughput, every sequence's new tokens over the summed wall time of the batches."""
    if res.get("batch_size", 1) == 1:
        return mean_tps(res["rows"])
    batches = res["batches"]
    return sum(b["new_tokens"] for b in batches) / sum(b["seconds"] for b in batches)


def latency(res: dict) -> float:
    """Mean wall time of a turn, per sequence (a batched sequence waits for its whole batch)."""
    return float(np.mean([t["seconds"] for r in res["rows"] for t in r["turns"]]))


def tau(rows: list[dict]) -> float | None:
    """Tokens per target forward over all turns (None when the method does not report forwards)."""
    from spec_jax.metrics import tau as tau_of

    turns = [t for r in rows for t in r["turns"]]
    if not turns or any(t.get("target_forwards") is None for t in turns):
        return None
    return tau_of(sum(t["new_tokens"] for t in turns), sum(t["target_forwards"] for t in turns), len(turns))


def mismatches(rows: list[dict], ar_rows: list[dict]) -> int:
    ar = {r["question_id"]: [t["token_ids"] for t in r["turns"]] for r in ar_rows}
    return sum([t["token_ids"] for t in r["turns"]] != ar.get(r["question_id"]) for r in rows)


def accepted_hist(rows: list[dict]) -> np.ndarray | None:
    hists = [t["accepted_hist"] for r in rows for t in r["turns"] if t.get("accepted_hist")]
    if not hists:
        return None
    out = np.zeros(max(map(len, hists)), np.int64)
    for h in hists:
        out[: len(h)] += h
    return out


def _fmt(x, spec=".2f"):
    return "-" if x is None or x != x else format(x, spec)


def summary_table(results: dict, bandwidth_gbs: float) -> tuple[str, dict]:
    """The overall table and the numbers behind it."""
    ar = speed(results["ar"]) if "ar" in results else None
    hf = speed(results["hf_ar"]) if "hf_ar" in results else None
    batch = max(r.get("batch_size", 1) for r in results.values())
    weight_bytes = next((r["weight_bytes"] for r in results.values() if r.get("weight_bytes")), None)
    # Batched, one read of the weights serves every sequence of a step.
    ceiling = batch * bandwidth_gbs * 1e9 / weight_bytes if weight_bytes else None
    lines = ["| method | tokens/s | tau | speedup vs AR | vs HF AR | x roofline | mismatches vs AR | draft ms/step "
             "| verify ms/step | host ms/step | compile+warm-up s | peak RSS MB |"
             + (" latency s/turn |" if batch > 1 else ""), "|---" * (12 + (batch > 1)) + "|"]
    numbers = {}
    for m, res in results.items():
        rows = res["rows"]
        v, t = speed(res), tau(rows)
        ph = res.get("phases") or {}
        mism = mismatches(rows, results["ar"]["rows"]) if "ar" in results else None
        numbers[m] = {"tokens_per_second": v, "tau": t, "speedup": v / ar if ar else None,
                      "vs_hf": v / hf if hf else None, "x_roofline": v / ceiling if ceiling else None,
                      "mismatches": mism, "nodes": res.get("nodes"), "batch_size": res.get("batch_size", 1),
                      "latency_seconds": latency(res)}
        lines.append(
            f"| {m} | {v:.1f} | {_fmt(t)} | {_fmt(numbers[m]['speedup'])} | {_fmt(numbers[m]['vs_hf'])} "
            f"| {_fmt(numbers[m]['x_roofline'])} | {'-' if mism is None else mism} "
            f"| {_fmt(ph.get('draft_ms_per_step'), '.1f')} | {_fmt(ph.get('verify_ms_per_step'), '.1f')} "
            f"| {_fmt(ph.get('host_ms_per_step'), '.2f')} | {res['warmup_seconds']:.1f} | {res['peak_rss_mb']:.0f} |"
            + (f" {numbers[m]['latency_seconds']:.2f} |" if batch > 1 else ""))
    if ceiling:
        lines += ["", f"Roofline: {weight_bytes / 1e6:.0f} MB of weights read per target forward at a measured "
                      f"{bandwidth_gbs:.1f} GB/s copy bandwidth: AR ceiling {ceiling:.1f} tokens/s"
                      + (f" at batch {batch} (weight reads only)." if batch > 1 else ".")]
    return "\n".join(lines), {"methods": numbers, "ar_ceiling": ceiling, "bandwidth_gbs": bandwidth_gbs,
                              "batch_size": batch}


def category_table(results: dict) -> tuple[str, dict]:
    """Method x category: tokens/s, speedup vs AR, tau, mismatches."""
    cats = list(dict.fromkeys(r["category"] for res in results.values() for r in res["rows"]))
    ar_rows = results["ar"]["rows"] if "ar" in results else None
    lines = ["| method | category | questions | tokens/s | speedup vs AR | tau | mismatches vs AR |", "|---" * 7 + "|"]
    numbers = {}
    for m, res in results.items():
        for c in cats:
            rows = [r for r in res["rows"] if r["category"] == c]
            if not rows:
                continue
            v = mean_tps(rows)
            ar_c = mean_tps([r for r in ar_rows if r["category"] == c]) if ar_rows else None
            mism = mismatches(rows, ar_rows) if ar_rows else None
            numbers.setdefault(m, {})[c] = {"tokens_per_second": v, "speedup": v / ar_c if ar_c else None,
                                            "tau": tau(rows), "mismatches": mism, "questions": len(rows)}
            lines.append(f"| {m} | {c} | {len(rows)} | {v:.1f} | {_fmt(numbers[m][c]['speedup'])} "
                         f"| {_fmt(numbers[m][c]['tau'])} | {'-' if mism is None else mism} |")
    return "\n".join(lines), numbers


def plots(out_dir: Path, results: dict, overall: dict, by_cat: dict) -> list[str]:
    """speedup_by_category.png, accepted_length.png, tps_vs_budget.png, roofline.png (those that apply)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, ax, name: str, title: str) -> None:
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_write(out_dir / name, lambda tmp: fig.savefig(tmp, dpi=120))  # noqa: B023 (called at once)
        plt.close(fig)
        written.append(name)

    methods = [m for m in results if m != "ar"]
    cats = list(dict.fromkeys(c for m in by_cat for c in by_cat[m]))
    if "ar" in results and methods:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) + 2), 4))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            vals = [by_cat.get(m, {}).get(c, {}).get("speedup") or 0 for c in cats]
            ax.bar(np.arange(len(cats)) + i * width, vals, width, label=m)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(cats)) + 0.4 - width / 2, cats, rotation=30, ha="right")
        ax.set_ylabel("speedup vs our AR")
        save(fig, ax, "speedup_by_category.png", "Speedup by category")

    hists = {m: accepted_hist(r["rows"]) for m, r in results.items()}
    hists = {m: h for m, h in hists.items() if h is not None and len(h) > 1}
    if hists:
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / len(hists)
        for i, (m, h) in enumerate(hists.items()):
            ax.bar(np.arange(len(h)) + i * width, h / max(h.sum(), 1), width, label=m)
        ax.set_xlabel("draft tokens accepted in a step")
        ax.set_ylabel("fraction of steps")
        save(fig, ax, "accepted_length.png", "Accepted length")

    # tokens/s against the draft budget (tree size), one line per method family
    # (a fixed budget is a point on its family's line; a --budget auto choice is a star on its own)
    families: dict[str, list] = {}
    chosen: dict[str, list] = {}
    for m, n in overall["methods"].items():
        if n.get("nodes"):
            auto = _is_auto(results[m].get("budget"))
            (chosen if auto else families).setdefault(m.split("/")[0], []).append((n["nodes"], n["tokens_per_second"]))
    if any(len(v) > 1 for v in families.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for fam, pts in families.items():
            pts.sort()
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=fam)
            for nodes, tps in chosen.pop(fam, []):
                ax.plot([nodes], [tps], "*", ms=14, color=line.get_color(), label=f"{fam} --budget auto")
        for fam, pts in chosen.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "*", ms=14, label=f"{fam} --budget auto")
        if "ar" in overall["methods"]:
            ax.axhline(overall["methods"]["ar"]["tokens_per_second"], color="k", ls="--", lw=0.8, label="ar")
        ax.set_xlabel("draft budget (tree nodes)")
        ax.set_ylabel("tokens/s")
        save(fig, ax, "tps_vs_budget.png", "Tokens/s against draft budget")

    ceiling = overall.get("ar_ceiling")
    if ceiling:
        names = list(overall["methods"])
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 4))
        ax.bar(names, [overall["methods"][m]["tokens_per_second"] for m in names])
        ax.axhline(ceiling, color="r", ls="--", label=f"AR roofline {ceiling:.1f} tok/s")
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", rotation=30)
        save(fig, ax, "roofline.png", "Tokens/s against the AR memory-bandwidth ceiling")
    return written


def _is_auto(budget: dict | None) -> bool:
    """Whether a method's budget record is a --budget auto choice (a fixed `budget=N` records only its nodes)."""
    return bool(budget) and "of_nodes" in budget


def write_report(out_dir: Path, results: dict, greedy: bool = True) -> str:
    """summary.md, summary.json and the plots; returns the Markdown."""
    bandwidth = memory_bandwidth_gbs()
    table, overall = summary_table(results, bandwidth)
    cat_table, by_cat = category_table(results)
    budgets = {m: r["budget"] for m, r in results.items() if _is_auto(r.get("budget"))}
    lines = ["# Benchmark summary", "", table, "", "## By category", "", cat_table]
    if budgets:
        lines += ["", "## Draft budgets chosen by --budget auto", ""]
        for m, b in budgets.items():
            if b["nodes"] == 0:  # no tree expected to beat AR: decoded as AR
                lines.append(f"- {m}: no tree, decoded as AR (best of {b.get('of_nodes', '?')} nodes: "
                             f"{b.get('best_tree_nodes', '?')}, expected {_fmt(b.get('best_tree_tokens_per_second'))} "
                             f"tokens/s per sequence against AR's {_fmt(b.get('ar_tokens_per_second'))}; "
                             f"calibration tau {_fmt(b.get('calibration_tau'))})")
                continue
            lines.append(f"- {m}: {b['nodes']} of {b.get('of_nodes', '?')} nodes (depth {b.get('depth', '?')}, "
                         f"expected tau {_fmt(b.get('expected_tau'))}, "
                         f"calibration tau {_fmt(b.get('calibration_tau'))})")
    devices = {m: r.get("device") for m, r in results.items()}
    batch = overall["batch_size"]
    speed_is = ("the mean over questions of per-question tokens/s (all turns)" if batch == 1 else
                f"throughput at batch {batch}: every sequence's new tokens over the batches' wall time (the "
                "by-category table gives per-sequence tokens/s); latency is a turn's wall time per sequence")
    lines += ["", f"Speed is {speed_is}; speedup is relative to "
                  "our AR in this run; compile and warm-up time are excluded and listed apart."
                  + (" Mismatches: questions whose greedy output differs from AR's." if greedy else ""),
              "", "Devices: " + "; ".join(f"{m}: {d}" for m, d in devices.items())]
    figs = plots(out_dir, results, overall, by_cat)
    if figs:
        lines += ["", "Plots: " + ", ".join(figs)]
    text = "\n".join(lines)
    atomic_write_text(out_dir / "summary.md", text + "\n")
    atomic_write_text(out_dir / "summary.json", json.dumps({"overall": overall, "by_category": by_cat,
                                                            "budgets": budgets}, indent=2, default=str) + "\n")
    return text


# ----------------------------------------------------------------------------- batch sweeps

def write_batch_sweep(run_dirs: list[Path], out_dir: Path) -> str:
    """One table and `batch_sweep.png` (throughput, and speedup over AR at the same batch size, against the
    batch size) from the `summary.json` of bench runs at several `--batch-size`s; returns the Markdown, also
    written to `batch_sweep.md`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from spec_jax.errors import DataFormatError

    runs = {}
    for d in run_dirs:
        try:
            overall = json.loads((Path(d) / "summary.json").read_text())["overall"]
            runs[int(overall.get("batch_size", 1))] = overall["methods"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"{d}: not a bench results folder ({e}); run `spec-jax bench --out {d}` first") \
                from None
    if len(runs) != len(run_dirs):
        raise DataFormatError("two of the folders hold runs at the same --batch-size; give one per batch size")
    sizes = sorted(runs)
    methods = list(dict.fromkeys(m for b in sizes for m in runs[b]))
    lines = ["| method | " + " | ".join(f"batch {b}: tokens/s (x AR)" for b in sizes) + " |",
             "|---" * (len(sizes) + 1) + "|"]
    for m in methods:
        cells = [f"{runs[b][m]['tokens_per_second']:.1f} ({_fmt(runs[b][m].get('speedup'))})" if m in runs[b]
                 else "-" for b in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, m in enumerate(methods):
        bs = [b for b in sizes if m in runs[b]]
        color = f"C{i % 10}"  # one colour per method in both panels
        ax1.plot(bs, [runs[b][m]["tokens_per_second"] for b in bs], "o-", color=color, label=m)
        if m != "ar":
            ax2.plot(bs, [runs[b][m].get("speedup") or float("nan") for b in bs], "o-", color=color, label=m)
    ax1.set(xscale="log", xlabel="batch size", ylabel="throughput (tokens/s)", title="Throughput")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set(xscale="log", xlabel="batch size", ylabel="speedup vs AR at the same batch size",
            title="Speedup over AR")
    for ax in (ax1, ax2):
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no "3 x 10^0" between the sizes
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "batch_sweep.png", lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    text = "\n".join(lines)
    atomic_write_text(out_dir / "batch_sweep.md", text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    import argparse

    from spec_jax.interrupts import run_command

    p = argparse.ArgumentParser(prog="python -m spec_jax.bench.report",
                                description="Table and plot of bench runs at several --batch-size values.")
    p.add_argument("runs", nargs="+", help="bench results folders (each with summary.json)")
    p.add_argument("--out", required=True, help="folder for batch_sweep.md and batch_sweep.png")
    args = p.parse_args(argv)
    return run_command(lambda: print(write_batch_sweep([Path(r) for r in args.runs], Path(args.out))) or 0,
                       prog="spec_jax.bench.report")


if __name__ == "__main__":
    sys.exit(main())
