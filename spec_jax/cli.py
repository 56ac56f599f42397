"""`spec-jax generate | methods | search-skip | search-exit | export-draft | bench`: the command line.

Errors the user can act on (`SpecJaxError`, bad flags) are printed as one line and exit with status 2;
Ctrl-C and SIGTERM print one line and exit with 130 and 143 (`spec_jax.interrupts`). Methods and
their flags come from the method registry (`spec_jax.drafters.registry`); `generate` and `bench` name
no method (`search-skip` and `search-exit` are layer skipping's and early exit's own tools).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from spec_jax.checks import Range, output_file, read_yaml, utf8_arg
from spec_jax.errors import InvalidArgumentError
from spec_jax.interrupts import run_command
from spec_jax.text import CALIBRATION_PROMPTS


def cmd_generate(args) -> int:
    from spec_jax.decoding import generate
    from spec_jax.decoding.setup import (
        check_devices,
        check_method_args,
        check_model,
        enable_compilation_cache,
        init_devices,
        load_target,
        prepare,
    )
    from spec_jax.sampling import Sampling
    from spec_jax.sharding import fetch
    from spec_jax.text import encode_prompt

    # Everything that needs no weights is checked before any are loaded.
    if not utf8_arg(args.prompt, "--prompt").strip():
        raise InvalidArgumentError("--prompt is empty: pass some text")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    check_devices(args)
    cfg = check_model(args.model, args.dtype)
    if args.max_new_tokens >= cfg.max_position_embeddings:
        raise InvalidArgumentError(f"--max-new-tokens {args.max_new_tokens}: the model has "
                                   f"{cfg.max_position_embeddings} positions for the prompt and the answer together")
    ignored = check_method_args(args.method, args, cfg)
    if ignored:
        print(f"spec-jax: warning: --method {args.method} does not take {', '.join(ignored)}; ignored",
              file=sys.stderr)
    t0 = time.perf_counter()
    mesh = init_devices(args)
    enable_compilation_cache()
    _say(args, f"loading {args.model}")
    target = load_target(args.model, args.dtype, mesh, cfg=cfg)
    tok = target.tokenizer
    prompt = encode_prompt(tok, args.prompt, args.chat)
    _say(args, f"loaded in {time.perf_counter() - t0:.1f}s; compiling {args.method} and decoding")
    run = prepare(args.method, args, target, sampling)
    engine, budget = run.engine, run.budget
    lead = _is_lead()
    if budget and not args.json and lead:
        print(f"[budget] {_budget_line(budget)}", file=sys.stderr)

    printed = [""]

    def stream(outs):
        text = tok.decode(outs[0], skip_special_tokens=True)
        if lead and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    phases = args.json if args.phase_timing is None else args.phase_timing
    gen = generate(engine, target.params, [prompt], args.max_new_tokens, seed=args.seed, weights=run.built.weights,
                   carry=run.built.carry, stream=None if args.json else stream, time_phases=phases)
    ids = gen.token_ids[0]
    stats = {"text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids, "method": args.method,
             **gen.stats(), "seconds_total": round(time.perf_counter() - t0, 3)}
    if budget:
        stats["budget"] = {k: v for k, v in budget.items() if k not in ("curve", "cost_seconds")}
    if lead and args.json:
        print(json.dumps(stats))
    elif lead:
        sys.stdout.write(stats["text"][len(printed[0]):] + "\n")
        print(summary_line(args.method, stats), file=sys.stderr)
    sys.stdout.flush()
    # Side files last: the results above are out even when a save fails (a clear error, non-zero exit).
    if run.built.save is not None and gen.carry is not None:
        carry = fetch(gen.carry, mesh)  # every process takes part in the gather; the lead writes
        if lead:
            run.built.save(carry)
    return 0


def summary_line(method: str, stats: dict) -> str:
    """The closing line of `generate`: time to the first token and decoding speed, each without compilation,
    which is reported apart (a cold run compiles; a warm one, reading the compilation cache, much less)."""
    decoded = stats["decode_tokens"]
    n = stats["new_tokens"]
    line = (f"[{method}] {n} token{'s' * (n != 1)}: first after {stats['first_token_seconds']:.2f} s "
            f"(compile {stats['compile_seconds']:.1f} s), ")
    if decoded:
        rate = stats["decode_tokens_per_second"]
        line += (f"then {decoded} in {stats['decode_seconds']:.2f} s = "
                 f"{'n/a' if rate is None else f'{rate:.1f}'} tok/s decoding, ")
    return line + f"tau {stats['tau']:.2f}, {stats['target_forwards']} target forwards"


def _budget_line(budget: dict) -> str:
    """What `--budget` chose, and for 'auto' whether it was calibrated now or taken from the cache."""
    text = f"{budget['nodes']}-node tree"
    if budget["nodes"] == 0:
        text = "no tree: decoding as AR"
    elif "depth" in budget:
        text += f" (depth {budget['depth']}, expected tau {budget['expected_tau']:.2f})"
    if budget.get("cached"):
        text += ", calibrated earlier for this model, device and method (--recalibrate measures again)"
    elif "calibration_seconds" in budget:
        text += f", calibrated in {budget['calibration_seconds']:.0f}s" + (
            "; cached for the next runs" if budget.get("cache_file") else "")
    return text


def _say(args, text: str) -> None:
    """Progress on stderr with --verbose."""
    if args.verbose and _is_lead():
        print(f"[spec-jax] {text}", file=sys.stderr, flush=True)


def _is_lead() -> bool:
    """Process 0 prints and writes files (every process of a multi-host run computes the same)."""
    import jax

    return jax.process_index() == 0


def cmd_methods(args) -> int:
    from spec_jax.drafters.registry import methods

    for m in methods().values():
        print(f"{m.name}: {m.description}")
        for o in m.options:
            kind = "flag" if o.type is bool else o.type.__name__
            print(f"    {o.flag} ({kind}, default {o.default}): {o.help}")
    return 0


def cmd_export_draft(args) -> int:
    from spec_jax.decoding.setup import check_model, load_target
    from spec_jax.drafters.draft_model import export_draft
    from spec_jax.drafters.registry import validate

    output_file(args.out, "--out")
    cfg = check_model(args.model, "float32")
    opts = validate("draft", {"draft_model": args.draft_model, "draft_layers": args.draft_layers}, cfg)
    out = export_draft(opts, load_target(args.model, "float32", cfg=cfg), args.out)
    print(f"draft model written to {out} (load it with transformers' AutoModelForCausalLM)")
    return 0


def cmd_search_skip(args) -> int:
    from tqdm import tqdm

    from spec_jax.decoding import Engine, generate
    from spec_jax.decoding.setup import check_model, enable_compilation_cache, load_target
    from spec_jax.drafters.layer_skip import save_skip_set, search_skip_set
    from spec_jax.text import calibration_prompts

    output_file(args.out, "--out")
    cfg = check_model(args.model, args.dtype)
    if args.max_skip is not None and args.max_skip >= cfg.num_layers:
        raise InvalidArgumentError(f"--max-skip {args.max_skip}: the model has {cfg.num_layers} layers and at least "
                                   f"one must remain; use at most {cfg.num_layers - 1}")
    enable_compilation_cache()
    target = load_target(args.model, args.dtype, cfg=cfg)
    params, cfg = target.params, target.cfg
    prompts = calibration_prompts(target.tokenizer, args.num_prompts)
    # Calibration text is the target's own greedy answers (self-distillation, no external data).
    gen = generate(Engine(cfg), params, prompts, args.calib_tokens)
    seqs = [p + o for p, o in zip(prompts, gen.token_ids, strict=True)]
    L = cfg.num_layers
    with tqdm(total=L + (args.max_skip or L - 1) * 6, desc="skip-set search") as bar:
        result = search_skip_set(params, cfg, seqs, max_skip=args.max_skip, k=args.draft_k,
                                 progress=bar.update)
    print(json.dumps({k: result[k] for k in ("skip", "agreement", "predicted_speedup", "beats_ar")}), flush=True)
    if not result["beats_ar"]:
        print(f"spec-jax: warning: no skip set is predicted to beat autoregressive decoding on this model; "
              f"saving the best one found ({result['predicted_speedup']:.2f}x predicted)", file=sys.stderr)
    path = save_skip_set(result, args.out, str(args.model))
    print(f"saved to {path}", file=sys.stderr)
    return 0


def cmd_search_exit(args) -> int:
    from tqdm import tqdm

    from spec_jax.decoding import Engine, generate
    from spec_jax.decoding.setup import check_model, enable_compilation_cache, load_target
    from spec_jax.drafters import early_exit as ee
    from spec_jax.drafters import vocab as dv
    from spec_jax.policies import make_policy
    from spec_jax.text import calibration_prompts

    output_file(args.out, "--out")
    cfg = check_model(args.model, args.dtype)
    heads = ee.head_dir(args, cfg)
    config = ee.read_exit_config(heads, cfg) if heads is not None else {}
    exits = _exit_list(args.exits) or config.get("exit_layers") or list(range(2, cfg.num_layers, 2)) or [1]
    for n in exits:
        ee.check_exit_layer(n, cfg, "--exits")
    dv.check_option(args.draft_vocab, cfg, heads)
    enable_compilation_cache()
    target = load_target(args.model, args.dtype, cfg=cfg)
    params, cfg = target.params, target.cfg
    adapters = {n: ee.load_exit_adapter(heads, cfg, n) for n in exits if n in config.get("exit_layers", ())}
    vocab = dv.with_vocab({}, args.draft_vocab, target, heads).get("vocab")
    prompts = calibration_prompts(target.tokenizer, args.num_prompts)
    # Calibration text is the target's own greedy answers (self-distillation, no external data).
    ar = generate(Engine(cfg), params, prompts, args.calib_tokens)
    seqs = [p + o for p, o in zip(prompts, ar.token_ids, strict=True)]
    with tqdm(total=len(exits), desc="exit costs") as bar:
        ranked = ee.rank_exits(params, cfg, seqs, exits, adapters, max_k=args.max_k, vocab=vocab, progress=bar.update)

    def tokens_per_s(engine, weights=None) -> float:  # the second run, compiled already
        generate(engine, params, prompts, args.time_tokens, weights=weights)
        return generate(engine, params, prompts, args.time_tokens, weights=weights).stats()["tokens_per_second"]

    ar_speed = tokens_per_s(Engine(cfg))
    for row in ranked[: args.top]:  # the best predicted, decoded for real
        n, k = row["exit_layer"], row["k"]
        weights = ({"adapter": adapters[n]} if n in adapters else {}) | ({"vocab": vocab} if vocab is not None else {})
        engine = Engine(cfg, ee.EarlyExit(exit_layer=n, policy=make_policy("fixed", k)))
        row["measured_speedup"] = round(tokens_per_s(engine, weights) / ar_speed, 3)
    best = max(ranked[: args.top], key=lambda r: r["measured_speedup"])
    result = {"exit_layer": best["exit_layer"], "k": best["k"], "measured_speedup": best["measured_speedup"],
              "agreement": best["agreement"], "ar_tokens_per_s": round(ar_speed, 2), "num_layers": cfg.num_layers,
              "exit_head": None if heads is None else str(heads), "draft_vocab": args.draft_vocab,
              "candidates": ranked}
    print(json.dumps({k: v for k, v in result.items() if k != "candidates"}), flush=True)
    print(f"saved to {ee.save_exit_choice(result, args.out, str(args.model))}", file=sys.stderr)
    return 0


def _exit_list(text: str | None) -> tuple[int, ...]:
    """`--exits 8,12,16` as layer counts (empty when not given)."""
    from spec_jax.training.data import layer_list

    try:
        return layer_list(text or "")
    except argparse.ArgumentTypeError as e:
        raise InvalidArgumentError(f"--exits: {e}") from None


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Defaults for `parser` from a YAML file of `option: value` (option names as in --help, - or _)."""
    data = read_yaml(path, "--config")
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"config file {path} must be a mapping of option: value")
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            raise InvalidArgumentError(f"config file {path}: unknown option {key!r}; see --help for the options")
        try:
            out[dest] = _config_value(actions[dest], value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise InvalidArgumentError(f"config file {path}: {key}: {e}") from None
    return out


def _config_value(action: argparse.Action, value):
    """A YAML value through the same type and choices as the flag (a list joins with commas)."""
    if value is None:
        raise argparse.ArgumentTypeError("has no value; give one or delete the line")
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
        return value
    if isinstance(value, list):
        value = ",".join(map(str, value))
    elif isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a single value, got a mapping {value!r}")
    if action.type is not None:
        value = action.type(value)
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the full usage is one `--help` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def main(argv=None) -> int:
    """Every command runs under `run_command`: user errors and interruptions end as one line."""
    try:
        return run_command(lambda: _main(argv))
    except SystemExit as e:  # argparse's usage errors (printed already) and --help, as a status
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2


def _main(argv) -> int:
    parser = _Parser(prog="spec-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from spec_jax.decoding.setup import add_method_args, add_model_args, add_sampling_args

    g = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(g)
    add_method_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("-v", "--verbose", action="store_true", help="report loading and compiling on stderr")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("--config", help="YAML file of option defaults (configs/)")
    g.add_argument("--phase-timing", action=argparse.BooleanOptionalAction, default=None,
                   help="time drafting and verification separately (one host round trip per step); "
                        "default: on with --json, off otherwise")
    g.set_defaults(fn=cmd_generate)

    sub.add_parser("methods", help="list the decoding methods with their options").set_defaults(fn=cmd_methods)

    s = sub.add_parser("search-skip", help="search a layer-skip set for --method layer_skip")
    s.add_argument("--model", default="smollm2-135m", help="short name, Hugging Face directory or .gguf file")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--out", required=True, help="where to write the skip-set JSON")
    s.add_argument("--num-prompts", type=Range(int, 1, len(CALIBRATION_PROMPTS)), default=4,
                   help="calibration prompts")
    s.add_argument("--calib-tokens", type=Range(int, 1), default=96, help="target tokens generated per prompt")
    s.add_argument("--max-skip", type=Range(int, 1), default=None, help="most layers skipped (default: all but one)")
    s.add_argument("--draft-k", type=Range(int, 1), default=4, help="draft length the search assumes")
    s.set_defaults(fn=cmd_search_skip)

    e = sub.add_parser("search-exit", help="pick the exit layer and draft length for --method early_exit by "
                                           "measured speed")
    e.add_argument("--model", default="smollm2-135m", help="short name, Hugging Face directory or .gguf file")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--out", required=True, help="where to write the exit choice (JSON, for --exit-file)")
    e.add_argument("--exit-head", default=None, help="exit adapters (default: those shipped for this model; 'none')")
    e.add_argument("--exits", default=None,
                   help="candidate exit layers, comma-separated (default: the adapters' exits, else every other layer)")
    e.add_argument("--num-prompts", type=Range(int, 1, len(CALIBRATION_PROMPTS)), default=4,
                   help="calibration prompts")
    e.add_argument("--calib-tokens", type=Range(int, 1), default=96, help="target tokens generated per prompt")
    e.add_argument("--max-k", type=Range(int, 1, 16), default=6, help="longest draft considered")
    e.add_argument("--top", type=Range(int, 1), default=3, help="best predicted candidates timed in real decoding")
    e.add_argument("--time-tokens", type=Range(int, 1), default=64, help="tokens per prompt of each timed decode")
    e.add_argument("--draft-vocab", type=Range(int, 0), default=0, help="reduced exit-head vocabulary (0: full)")
    e.set_defaults(fn=cmd_search_exit)

    x = sub.add_parser("export-draft", help="write the draft model of --method draft as an HF directory "
                                            "(transformers' assisted generation runs it: hf_assisted)")
    x.add_argument("--model", default="smollm2-135m", help="the target: short name, HF directory or .gguf file")
    x.add_argument("--out", required=True, help="the HF directory to write")
    x.add_argument("--draft-model", default=None, help="a distilled draft directory (default: the one shipped for "
                                                       "the target)")
    x.add_argument("--draft-layers", type=Range(int, 1), default=None,
                   help="export the target's first N layers instead (the stand-in draft)")
    x.set_defaults(fn=cmd_export_draft)

    b = sub.add_parser("bench", help="benchmark methods against our AR and Hugging Face in one run")
    from spec_jax.bench.run import add_bench_args, cmd_bench

    add_bench_args(b)
    b.set_defaults(fn=cmd_bench)

    args = parser.parse_args(argv)
    if getattr(args, "config", None):  # a YAML experiment config supplies defaults; flags still win
        sub_parser = sub.choices[args.command]
        sub_parser.set_defaults(**load_config(args.config, sub_parser))
        args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
