"""`spec-jax bench`: several methods and Hugging Face transformers on the same questions, in one run.

Measured as Spec-Bench does it: each question's turns are generated in order (the second MT-Bench turn
is sent after the model's own first answer), per-question tokens/s is new tokens over wall time
summed over its turns, a method's speed is the mean over questions, and speedup is that mean over
AR's mean in the same run. Compilation (and any other warm-up) is excluded from those figures and
reported separately. Each method runs in its own worker process, so its peak resident memory is its
own. Results go to a folder: JSON lines per method, `summary.md`, PNG plots and `run.json` (device,
versions, config); see `spec_jax.bench.report`. Each method's results are saved as it finishes, so the same
command again resumes an interrupted run (see "resuming" below).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spec_jax.checks import Range, output_dir
from spec_jax.files import atomic_write_text
from spec_jax.interrupts import run_command
from spec_jax.metrics import tau

HF_METHODS = ("hf_ar", "hf_pld", "hf_assisted")  # transformers generate: plain, prompt lookup, assisted


def add_bench_args(p: argparse.ArgumentParser) -> None:
    from spec_jax.decoding.setup import MAX_NEW_TOKENS, add_method_args, add_model_args
    from spec_jax.drafters.registry import methods

    add_model_args(p)
    p.add_argument("--config", help="YAML file of option defaults (configs/)")
    p.add_argument("--methods", default="ar,pld,hf_ar",
                   help=f"comma-separated, each `name` or `name/option=value/...` (e.g. token_recycling/budget=auto); "
                        f"names: {', '.join((*methods(), *HF_METHODS))}")
    p.add_argument("--dataset", default="mtbench",
                   help="mtbench (80 questions, 2 turns), humaneval (164), long (15 prompts of 800-2,000 tokens), or a "
                        "Spec-Bench question.jsonl path")
    p.add_argument("--categories", help="comma-separated categories to keep (default: all)")
    p.add_argument("--per-category", type=Range(int, 1), default=None, help="at most this many questions per category")
    p.add_argument("--num-prompts", type=Range(int, 1), default=None, help="at most this many questions in all")
    p.add_argument("--max-turns", type=Range(int, 1), default=None, help="turns per question (default: all)")
    p.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=256)
    p.add_argument("--batch-size", type=Range(int, 1), default=1,
                   help="questions decoded at once, each turn as one batch with ragged acceptance per sequence; "
                        "above 1, tokens/s is throughput (every sequence's new tokens over wall time) and each "
                        "sequence's latency is its batch's wall time")
    add_method_args(p, method_flag=False)
    p.add_argument("--hf-pld-tokens", type=Range(int, 1), default=10, help="prompt_lookup_num_tokens for hf_pld")
    p.add_argument("--out", default="results/bench", help="results folder; a run there with the same settings is "
                   "resumed: its complete methods are not run again")
    p.add_argument("--fresh", action="store_true",
                   help="discard a run already in --out (its methods' results) instead of resuming it")
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)  # generate's flag, unused


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- workers

def _conversations(spec, tok, answer):
    """Run the questions `batch_size` at a time, each turn of a batch as one call `answer(list of ids)` ->
    [(new ids, stats)] (a later turn is sent after the model's own earlier answers). Yields one row per
    question; `spec["batches"]` gets each call's size, new tokens and seconds (for throughput)."""
    from tqdm import tqdm

    from spec_jax.text import encode_messages

    questions, size = spec["questions"], spec.get("batch_size", 1)
    with tqdm(total=len(questions), desc=spec["entry"], file=sys.stderr, unit="q", mininterval=5) as bar:
        for start in range(0, len(questions), size):
            chunk = questions[start:start + size]
            messages, turns = [[] for _ in chunk], [[] for _ in chunk]
            for t in range(max(len(q["turns"][: spec["max_turns"]]) for q in chunk)):
                live = [i for i, q in enumerate(chunk) if t < len(q["turns"][: spec["max_turns"]])]
                ids = []
                for i in live:
                    messages[i].append({"role": "user", "content": chunk[i]["turns"][t]})
                    ids.append(encode_messages(tok, messages[i]))
                answers = answer(ids)
                spec.setdefault("batches", []).append(
                    {"size": len(ids), "new_tokens": sum(s["new_tokens"] for _, s in answers),
                     "seconds": answers[0][1]["seconds"]})
                for i, p, (new, stats) in zip(live, ids, answers, strict=True):
                    messages[i].append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)})
                    turns[i].append({"prompt_tokens": len(p), "token_ids": new, **stats})
            for q, ts in zip(chunk, turns, strict=True):
                yield _question_row(q, ts)
            bar.update(len(chunk))


def _question_row(q: dict, turns: list[dict]) -> dict:
    new = sum(t["new_tokens"] for t in turns)
    sec = sum(t["seconds"] for t in turns)
    row = {"question_id": q["question_id"], "category": q["category"], "new_tokens": new, "seconds": sec,
           "tokens_per_second": new / sec if sec else float("nan"), "turns": turns}
    if all(t.get("target_forwards") is not None for t in turns):
        row["tau"] = tau(new, sum(t["target_forwards"] for t in turns), len(turns))
    return row


def _worker_ours(spec: dict) -> dict:
    import jax

    from spec_jax.decoding import generate
    from spec_jax.decoding.setup import enable_compilation_cache, init_devices, load_target, prepare
    from spec_jax.drafters.registry import load_module
    from spec_jax.models import param_bytes
    from spec_jax.sharding import fetch
    from spec_jax.text import encode_messages

    load_module(*spec["method_module"])  # methods defined outside the package register on import
    args = argparse.Namespace(**spec["method_args"])
    mesh = init_devices(args)
    enable_compilation_cache()
    target = load_target(spec["model"], spec["dtype"], mesh)
    params, tok = target.params, target.tokenizer
    t = time.perf_counter()
    run = prepare(spec["method"], args, target, batch=spec.get("batch_size", 1))
    budget_seconds = time.perf_counter() - t
    engine, weights = run.engine, run.built.weights
    max_new = spec["max_new_tokens"]
    size = engine.cache_size(spec["max_prompt_tokens"], max_new)
    seen, warm = set(), [0.0]
    state = {"carry": run.built.carry}  # drafters that learn while decoding (Token Recycling) carry what they
    # learned from question to question, starting from their initial carry, not from warm-up runs

    def answer(batch):
        # The compiled programs depend on the batch size, the prompt-length bucket and the carry's structure (a
        # drafter's first request starts from its initial carry, often None; later ones from what it learned)
        shape = (len(batch), engine.pad_prompts(batch)[0].shape[1], jax.tree.structure(state["carry"]),
                 tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(state["carry"])))
        if shape not in seen:  # compile for this shape, untimed (the carry is the one the timed run gets)
            seen.add(shape)
            t = time.perf_counter()
            generate(engine, params, batch, 2, weights=weights, carry=state["carry"], cache_size=size)
            warm[0] += time.perf_counter() - t
        g = generate(engine, params, batch, max_new, weights=weights, carry=state["carry"], cache_size=size)
        state["carry"] = g.carry
        stats = g.stats()
        seconds = g.first_token_seconds + g.decode_seconds  # a compile the warm-up missed is not the method's speed
        warm[0] += g.seconds - seconds
        hist = _accepted_hist(g.accepted_at, stats["target_forwards"] - len(batch))  # the batch's, summed
        return [(ids, {"new_tokens": len(ids), "seconds": seconds, "tokens_per_second": len(ids) / seconds,
                       "target_forwards": forwards,
                       # the batch's histogram goes with its first sequence, so that sums over turns stay exact
                       "accepted_hist": hist if i == 0 else None})
                for i, (ids, forwards) in enumerate(zip(g.token_ids, g.target_forwards, strict=True))]

    rows = list(_conversations(spec, tok, answer))
    if run.built.save is not None and state["carry"] is not None:  # e.g. --tr-matrix: what the run learned
        run.built.save(fetch(state["carry"], mesh))
    # Where the time goes: the first batch's first turns again with drafting and verification timed apart
    # (after compiling the two halves); the speed figures above come from the fused loop.
    first = [encode_messages(tok, [{"role": "user", "content": q["turns"][0]}])
             for q in spec["questions"][: spec.get("batch_size", 1)]]
    t = time.perf_counter()
    generate(engine, params, first, 4, weights=weights, carry=run.built.carry, cache_size=size, time_phases=True)
    warm[0] += time.perf_counter() - t
    g = generate(engine, params, first, max_new, weights=weights, carry=run.built.carry, cache_size=size,
                 time_phases=True)
    steps = max(max(g.target_forwards) - 1, 1)
    phases = {"draft_ms_per_step": 1e3 * g.draft_seconds / steps, "verify_ms_per_step": 1e3 * g.verify_seconds / steps,
              "host_ms_per_step": 1e3 * g.host_seconds / steps}
    return {"rows": rows, "batches": spec["batches"], "batch_size": spec.get("batch_size", 1),
            "warmup_seconds": warm[0], "peak_rss_mb": peak_rss_mb(), "weight_bytes": param_bytes(params),
            "phases": phases, "budget": run.budget, "budget_seconds": budget_seconds,
            "nodes": engine.shape.nodes, "device": _device()}


def _accepted_hist(accepted_at: list[int], steps: int) -> list[int]:
    """Steps that accepted exactly n drafts, n = 0..D (from the per-depth counts of accepting steps)."""
    at_least = [steps] + list(accepted_at) + [0]
    return [max(at_least[n] - at_least[n + 1], 0) for n in range(len(accepted_at) + 1)]


def _worker_hf(spec: dict) -> dict:
    import torch

    from spec_jax.models.registry import load_tokenizer, resolve

    torch.set_num_threads(os.cpu_count() or 1)
    model = _hf_model(resolve(spec["model"]))
    tok = load_tokenizer(spec["model"])
    extra = {}
    if spec["method"] == "hf_pld":
        extra = {"prompt_lookup_num_tokens": spec["method_args"]["hf_pld_tokens"]}
    elif spec["method"] == "hf_assisted":
        with tempfile.TemporaryDirectory(prefix="spec-jax-draft-") as tmp:  # removed even on Ctrl-C
            extra = {"assistant_model": _hf_model(_export_draft(spec, Path(tmp)))}
    max_new = spec["max_new_tokens"]
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False, **extra)
    warmup = time.perf_counter() - t

    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = 0 if eos is None else eos

    def answer(batch):
        # A batch is left-padded (transformers' way); each answer ends at its first EOS, as ours do.
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=pad, **extra)
            sec = time.perf_counter() - t
        # transformers does not report target forwards for prompt lookup or assisted generation.
        ar = spec["method"] == "hf_ar"
        answers = []
        for row in out[:, width:].tolist():
            new = row[: row.index(eos) + 1] if eos is not None and eos in row else row
            answers.append((new, {"new_tokens": len(new), "seconds": sec, "tokens_per_second": len(new) / sec,
                                  "target_forwards": len(new) if ar else None}))
        return answers

    rows = list(_conversations(spec, tok, answer))
    return {"rows": rows, "batches": spec["batches"], "batch_size": spec.get("batch_size", 1),
            "warmup_seconds": warmup, "peak_rss_mb": peak_rss_mb(), "weight_bytes": None,
            "device": {"platform": "cpu (torch)", "threads": torch.get_num_threads()}}


def _hf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent if kw else path, dtype=torch.float32, **kw)
    return model.eval()


def _export_draft(spec: dict, tmp: Path) -> Path:
    """The draft model for `hf_assisted` in HF format: the draft `draft` would use with these options (a
    distilled draft, `--draft-model`, or the stand-in), exported with `draft_model.export_draft`; an HF
    directory or GGUF file given as `--draft-model` is used as it is."""
    from spec_jax.decoding.setup import load_target
    from spec_jax.drafters.draft_model import draft_source, export_draft
    from spec_jax.drafters.registry import options_for
    from spec_jax.models.registry import load_config, resolve

    opts = options_for("draft", spec["method_args"])
    kind, source = draft_source(opts, load_config(spec["model"]))
    if kind == "model":
        path = resolve(source)
        if path.suffix == ".gguf" or (path / "config.json").exists():
            return path
    return export_draft(opts, load_target(spec["model"], "float32"), tmp / "draft")


def _device() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count()}


def _run_worker(spec: dict) -> dict:
    """Run one method in its own process (the spec goes in on stdin, the result comes back in a file).

    The worker has its own process group, so a terminal's Ctrl-C reaches only this process, which then
    stops the worker with SIGTERM and waits for it: the worker leaves nothing half-written, and its
    interruption is reported once, here.
    """
    from spec_jax.errors import SpecJaxError

    out, proc = Path(spec["out_file"]), None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "spec_jax.bench.run", "--worker"], stdin=subprocess.PIPE,
                                stdout=sys.stderr, stderr=sys.stderr, text=True, process_group=0)
        try:
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the worker ended before reading its spec; its exit status says how
        code = proc.wait()
        if code != 0:
            how = f"exit {code}" if code > 0 else f"killed by {signal.Signals(-code).name}"
            raise SpecJaxError(f"the benchmark of {spec['entry']} failed ({how}); its error is above")
        return json.loads(out.read_text())
    except BaseException:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        raise
    finally:
        out.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- driver

def parse_method(entry: str) -> tuple[str, dict]:
    """`name/option=value/...`: a method with its own settings, e.g. `token_recycling/budget=auto`."""
    from spec_jax.drafters.registry import all_options, methods
    from spec_jax.errors import InvalidArgumentError

    name, *opts = entry.split("/")
    names = (*methods(), *HF_METHODS)
    if name not in names:
        raise InvalidArgumentError(f"--methods: unknown method {name!r} in {entry!r}; valid methods: "
                                   f"{', '.join(names)}")
    settable = (*all_options(), "budget", "verify", "hf_pld_tokens")
    overrides = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidArgumentError(f"--methods entry {entry!r}: expected name/option=value, got {opt!r}")
        if key not in settable:
            raise InvalidArgumentError(f"--methods entry {entry!r}: unknown option {key!r}; per-method options are "
                                       "those of `spec-jax methods`, budget, verify and hf_pld_tokens")
        overrides[key] = value
    return name, overrides


def check_bench(args) -> tuple:
    """Everything a bench can check before running anything: the output folder, the model's files, every
    method entry (options, files, against the model's config), the questions and the tokenizer.
    Returns (entries, parsed entries, questions, tokenizer, model Config)."""
    import importlib.util

    from spec_jax.bench.datasets import load_dataset, select
    from spec_jax.decoding.setup import check_devices, check_method_args, check_model
    from spec_jax.decoding.verify import VERIFY_MODES
    from spec_jax.drafters.registry import get, validate
    from spec_jax.errors import InvalidArgumentError, SpecJaxError
    from spec_jax.models.registry import check_tokenizer_fits, load_tokenizer

    output_dir(args.out, "--out")
    check_devices(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise InvalidArgumentError("--methods is empty; name at least one method (e.g. ar,pld)")
    if len(set(methods)) != len(methods):
        raise InvalidArgumentError(f"--methods names {next(m for m in methods if methods.count(m) > 1)!r} twice")
    parsed = {m: parse_method(m) for m in methods}
    cfg = check_model(args.model, args.dtype)
    matrices = {}  # --tr-matrix path -> the entries that load it and save it back
    for m, (name, overrides) in parsed.items():
        values = argparse.Namespace(**{**vars(args), **overrides})
        try:
            if values.verify not in VERIFY_MODES:
                raise InvalidArgumentError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {values.verify!r}")
            values.hf_pld_tokens = Range(int, 1)(values.hf_pld_tokens) if "hf_pld_tokens" in overrides \
                else values.hf_pld_tokens
            if name in HF_METHODS:
                if importlib.util.find_spec("torch") is None:
                    raise InvalidArgumentError("the Hugging Face peers need PyTorch; install them with "
                                               "`pip install -e .[peers]`")
                if name != "hf_ar" and args.batch_size > 1:
                    raise InvalidArgumentError(f"transformers runs {name} one sequence at a time; benchmark it "
                                               "with --batch-size 1 (hf_ar takes batches)")
                own = {"hf_pld": {"hf_pld_tokens"}, "hf_assisted": {"draft_model", "draft_layers"}}.get(name, set())
                if name == "hf_assisted":
                    validate("draft", vars(values), cfg)
            else:
                ignored = check_method_args(name, values, cfg)
                own = {o.name for o in get(name).options} | {"budget", "verify"}
                if getattr(values, "tr_matrix", None) and "--tr-matrix" not in ignored:
                    matrices.setdefault(values.tr_matrix, []).append(m)
            extra = sorted(set(overrides) - own)
            if extra:
                raise InvalidArgumentError(f"{name} does not take {extra[0]!r}")
        except argparse.ArgumentTypeError as e:
            raise InvalidArgumentError(f"--methods entry {m!r}: hf_pld_tokens {e}") from None
        except SpecJaxError as e:
            raise type(e)(f"--methods entry {m!r}: {e}") from None
    for path, users in matrices.items():
        if len(users) > 1:  # each would start from what the one before it saved: figures depend on the order
            raise InvalidArgumentError(f"--tr-matrix {path} would be loaded and saved by {' and '.join(users)}; "
                                       "benchmark them in separate runs")
    cats = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    questions = select(load_dataset(args.dataset), cats, args.per_category, args.num_prompts)
    tok = load_tokenizer(args.model)
    check_tokenizer_fits(tok, cfg, args.model)
    return methods, parsed, questions, tok, cfg


def cmd_bench(args) -> int:
    from spec_jax.bench import report
    from spec_jax.drafters.registry import methods as registered
    from spec_jax.errors import InvalidArgumentError, SpecJaxError
    from spec_jax.text import encode_messages

    methods, parsed, questions, tok, cfg = check_bench(args)
    turns = args.max_turns or max(len(q["turns"]) for q in questions)
    # Room for later turns: the earlier turns' text and answers are part of their prompts.
    longest = max(len(encode_messages(tok, [{"role": "user", "content": "\n".join(q["turns"][:turns])}]))
                  for q in questions)
    max_prompt = longest + (turns - 1) * (args.max_new_tokens + 16)
    if max_prompt + args.max_new_tokens > cfg.max_position_embeddings:
        raise InvalidArgumentError(
            f"the longest conversation needs about {max_prompt + args.max_new_tokens} positions ({turns} turn(s) of "
            f"--max-new-tokens {args.max_new_tokens}) but the model has {cfg.max_position_embeddings}; lower "
            "--max-new-tokens or --max-turns")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = report.run_settings(args, questions)
    previous, results = _resume(out_dir, args, methods, questions, settings)
    report.write_run_info(out_dir, args, [*methods, *(m for m in results if m not in methods)], questions, settings,
                          previous)
    for m in methods:
        if m in results:
            continue
        print(f"[bench] {m}: {len(questions)} questions x {turns} turn(s) x {args.max_new_tokens} new tokens"
              + (f", {args.batch_size} at a time" if args.batch_size > 1 else ""), file=sys.stderr)
        name, overrides = parsed[m]
        method_args = {**{k: v for k, v in vars(args).items() if k != "fn"}, **overrides, "method": name}
        module = None if name in HF_METHODS else (registered()[name].module, registered()[name].source)
        spec = {"entry": m, "method": name, "method_module": module, "model": args.model, "dtype": args.dtype,
                "questions": questions,
                "max_turns": turns, "max_new_tokens": args.max_new_tokens, "max_prompt_tokens": max_prompt,
                "batch_size": args.batch_size,
                "method_args": method_args, "out_file": str(out_dir / f".{_slug(m)}.{os.getpid()}.worker.json")}
        try:
            results[m] = _run_worker(spec)
        except BaseException as e:  # a failure or Ctrl-C: what finished is kept, its rows and its summary
            if not results:
                raise
            text = report.write_report(out_dir, _in_order(results, methods), greedy=True)
            if not isinstance(e, SpecJaxError):
                raise
            print(text)
            raise type(e)(f"{e}; the summary of {', '.join(results)} is in {out_dir / 'summary.md'}; run the "
                          "same command again to run the rest") from None
        _save_method(out_dir, m, results[m])
    text = report.write_report(out_dir, _in_order(results, methods), greedy=True)
    print(text)
    return 0


# ----------------------------------------------------------------------------- resuming
# A method's results are two files: METHOD.jsonl (one row per question) and METHOD.meta.json (the rest of what
# its worker measured). Each is written atomically, the rows first, so the meta file marks a complete method.
# Per question there is nothing to resume: a method carries state from question to question (Token Recycling's
# matrix, compiled shapes), so an interrupted method runs again from its first question.

def _save_method(out_dir: Path, entry: str, result: dict) -> None:
    atomic_write_text(out_dir / f"{_slug(entry)}.jsonl",
                      "".join(json.dumps({"method": entry, **row}) + "\n" for row in result["rows"]))
    meta = {"method": entry, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            **{k: v for k, v in result.items() if k != "rows"}}
    atomic_write_text(out_dir / f"{_slug(entry)}.meta.json", json.dumps(meta, default=str) + "\n")


def _load_method(out_dir: Path, entry: str, questions: list[dict]) -> dict | None:
    """A method's stored results when they are complete for these questions, else None."""
    from spec_jax.bench.datasets import read_jsonl
    from spec_jax.errors import DataFormatError

    meta_path, rows_path = out_dir / f"{_slug(entry)}.meta.json", out_dir / f"{_slug(entry)}.jsonl"
    if not meta_path.is_file() or not rows_path.is_file():
        return None
    try:
        meta, rows = json.loads(meta_path.read_text()), read_jsonl(rows_path)
    except (OSError, ValueError, DataFormatError):
        return None
    if meta.get("method") != entry or [r.get("question_id") for r in rows] != [q["question_id"] for q in questions]:
        return None
    meta.pop("finished", None)
    return {**{k: v for k, v in meta.items() if k != "method"}, "rows": [{k: v for k, v in r.items() if k != "method"}
                                                                          for r in rows]}


def _resume(out_dir: Path, args, methods: list[str], questions: list[dict], settings: dict) -> tuple:
    """(the stored run.json to continue, or None; the complete results found in `out_dir`, by entry).

    A folder holding a run with other settings is refused, unless `--fresh`, which removes that run's files
    first. Methods complete in the folder but not named now stay in the summary (same settings, same sitting).
    """
    from spec_jax.bench.report import settings_differences
    from spec_jax.errors import InvalidArgumentError

    try:
        stored = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        stored = None
    if stored is None:
        return None, {}
    entries = list(dict.fromkeys([*stored.get("methods", []), *methods]))
    if args.fresh or "settings" not in stored:  # --fresh, or a run.json from before runs could be resumed
        for m in entries:
            for name in (f"{_slug(m)}.meta.json", f"{_slug(m)}.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        why = "--fresh" if args.fresh else "it was written before bench runs could be resumed"
        print(f"[bench] discarding the run in {out_dir} ({why}); every method runs", file=sys.stderr)
        return None, {}
    diffs = settings_differences(stored["settings"], settings)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise InvalidArgumentError(f"--out {out_dir} holds a run with other settings ({shown}); use another --out, "
                                   "run the same settings again to resume it, or add --fresh to discard it")
    results = {}
    for m in entries:
        res = _load_method(out_dir, m, questions)
        if res is not None:
            results[m] = res
            why = "" if m in methods else " (not named now; kept in the summary)"
            print(f"[bench] {m}: complete in {out_dir} ({_slug(m)}.jsonl), not run again{why}", file=sys.stderr)
    return stored, results


def _in_order(results: dict, methods: list[str]) -> dict:
    """The results with the methods named now first, in their order, then those kept from earlier runs."""
    return {m: results[m] for m in [*methods, *(m for m in results if m not in methods)] if m in results}


def _slug(entry: str) -> str:
    return entry.replace("/", "_").replace("=", "-")


def _stop_when_orphaned(interval: float = 2.0) -> None:
    """SIGTERM this worker once its driver is gone (killed with SIGKILL, say, which it cannot pass on), so that
    no orphan keeps decoding next to the run that resumes it."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="orphan-watch").start()


def _worker_main() -> int:
    spec = json.loads(sys.stdin.read())
    _stop_when_orphaned()
    fn = _worker_hf if spec["method"] in HF_METHODS else _worker_ours

    def body():
        atomic_write_text(spec["out_file"], json.dumps(fn(spec)))
        return 0

    # Interrupted quietly: the driver, in the same process group, reports it.
    return run_command(body, prog=f"spec-jax bench ({spec['entry']})", quiet=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker_main())
    sys.exit("usage: python -m spec_jax.bench.run --worker < SPEC.json (use `spec-jax bench`)")
