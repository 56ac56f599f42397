"""`spec-jax generate | search-skip | bench`: the command line.

Errors the user can act on (`SpecJaxError`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from spec_jax.errors import InvalidArgumentError, SpecJaxError

METHODS = ("ar", "draft", "draft_tree", "layer_skip", "token_recycling", "pld", "lookahead", "sam", "sam_tr")


def _enable_compilation_cache() -> None:
    """Persist compiled XLA programs so the second run starts in seconds."""
    import jax

    root = Path(os.environ.get("SPEC_JAX_CACHE", Path.home() / ".cache" / "spec_jax"))
    jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="short name (smollm2-135m), Hugging Face directory or .gguf file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter dtype (float32 is fastest on CPU; bfloat16 for GPU/TPU)")


def add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="ar", choices=METHODS, help="decoding method")
    add_drafter_args(p)


def add_drafter_args(p: argparse.ArgumentParser) -> None:
    """Settings of the drafters (shared by `generate` and `bench`)."""
    p.add_argument("--draft-model", help="draft model for --method draft (name, HF dir or .gguf); "
                   "default: the target's first --draft-layers layers as a stand-in")
    p.add_argument("--draft-layers", type=int, default=8,
                   help="layers of the stand-in early-exit draft model (when --draft-model is not given)")
    p.add_argument("--draft-k", type=int, default=None,
                   help="maximum draft length (default 5; sam 6; sam_tr: depth of its retrieval path, 8; "
                        "layer_skip: the k saved with the skip set)")
    p.add_argument("--length-policy", default="fixed", choices=["fixed", "heuristic", "svip"],
                   help="draft-length policy for chain drafters")
    p.add_argument("--skip-file", help="skip-set JSON written by `spec-jax search-skip` (layer_skip)")
    t = p.add_argument_group("dynamic trees (draft_tree)")
    t.add_argument("--tree-depth", type=int, default=4, help="levels of the tree")
    t.add_argument("--tree-width", type=int, default=4, help="nodes expanded per level")
    t.add_argument("--tree-k", type=int, default=4, help="children per expanded node")
    t.add_argument("--tree-budget", type=int, default=12, help="nodes kept for verification")
    t.add_argument("--sampled-children", action="store_true",
                   help="draw children i.i.d. from the draft (recursive rejection sampling) instead of "
                        "its top-k; keeps the whole expansion")
    r = p.add_argument_group("token recycling")
    r.add_argument("--tr-k", type=int, default=8, help="successors kept per token")
    r.add_argument("--tr-levels", default="8,21,25,15,8,3", help="tree nodes per level (comma-separated)")
    r.add_argument("--tr-matrix", help="adjacency-matrix file (.npy): loaded if it exists, saved after the run")
    r.add_argument("--budget", default=None,
                   help="tree size: a node count, or 'auto' to measure this device's verification cost and "
                        "the drafter's acceptance on calibration prompts and pick the fastest size")
    n = p.add_argument_group("prompt lookup (pld)")
    n.add_argument("--ngram-max", type=int, default=3, help="longest n-gram looked up")
    n.add_argument("--ngram-min", type=int, default=1, help="shortest n-gram looked up")
    la = p.add_argument_group("lookahead")
    la.add_argument("--la-window", type=int, default=4, help="Jacobi window W (columns)")
    la.add_argument("--la-ngram", type=int, default=4, help="n-gram size N (the window keeps N-1 levels)")
    la.add_argument("--la-candidates", type=int, default=4, help="n-grams verified per step G")
    la.add_argument("--la-no-prompt-ngrams", action="store_true",
                    help="start the n-gram pool empty (the paper) instead of seeding it with the prompt's")
    sa = p.add_argument_group("suffix automaton (sam, sam_tr)")
    sa.add_argument("--sam-min-match", type=int, default=None,
                    help="shortest match that drafts (default 1 for sam; 4 for sam_tr, below which it "
                         "drafts with Token Recycling)")
    sa.add_argument("--sam-corpus", help="static corpus: token ids (.npy) or text (.txt) to retrieve from too")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def build_method(args, params, cfg, target_tok=None):
    """(drafter, draft params) for `--method`."""
    from spec_jax.drafters import Drafter
    from spec_jax.drafters.draft_model import DraftModel, DraftModelTree
    from spec_jax.drafters.dynamic_tree import DynamicTree
    from spec_jax.drafters.layer_skip import LayerSkip, load_skip_set
    from spec_jax.models import truncate
    from spec_jax.models.registry import check_same_tokenizer, load_model, load_tokenizer
    from spec_jax.policies import make_policy

    if args.method == "ar":
        return Drafter(), None
    if args.method in ("draft", "draft_tree"):
        if args.draft_model:
            dparams, dcfg = load_model(args.draft_model, args.dtype)
            check_same_tokenizer(target_tok, load_tokenizer(args.draft_model), cfg, dcfg)
        else:
            dparams, dcfg = truncate(params, cfg, args.draft_layers)
        if args.method == "draft_tree":
            tree = DynamicTree(args.tree_depth, args.tree_width, args.tree_k, args.tree_budget, args.sampled_children)
            return DraftModelTree(draft_cfg=dcfg, tree=tree), dparams
        return DraftModel(draft_cfg=dcfg, policy=make_policy(args.length_policy, args.draft_k or 5)), dparams
    if args.method == "token_recycling":
        from spec_jax.drafters.token_recycling import TokenRecycling

        levels, matrix = _token_recycling_settings(args)
        return TokenRecycling(k=args.tr_k, levels=levels), matrix
    if args.method == "lookahead":
        from spec_jax.drafters.lookahead import Lookahead

        return Lookahead(window=args.la_window, ngram=args.la_ngram, candidates=args.la_candidates,
                         seed_from_prompt=not args.la_no_prompt_ngrams), None
    if args.method in ("sam", "sam_tr"):
        from spec_jax.drafters.suffix_automaton import (
            SAMHost,
            SAMTokenRecycling,
            SuffixAutomatonDrafter,
            load_corpus,
        )

        host = SAMHost(load_corpus(args.sam_corpus, target_tok) if args.sam_corpus else None)
        if args.method == "sam":
            return SuffixAutomatonDrafter(k=args.draft_k or 6, min_match=args.sam_min_match or 1,
                                          host_state=host), None
        levels, matrix = _token_recycling_settings(args)
        return SAMTokenRecycling(k=args.tr_k, levels=levels, sam_k=args.draft_k or 8,
                                 min_match=args.sam_min_match or 4, host_state=host), matrix
    if args.method == "pld":
        from spec_jax.drafters.prompt_lookup import PromptLookup

        return PromptLookup(k=args.draft_k or 5, max_ngram=args.ngram_max, min_ngram=args.ngram_min), None
    if args.method == "layer_skip":
        if not args.skip_file:
            raise InvalidArgumentError("--method layer_skip needs --skip-file; create one with "
                                       "`spec-jax search-skip --out skip.json`")
        skip, k = load_skip_set(args.skip_file, cfg)
        return LayerSkip(skip=skip, policy=make_policy(args.length_policy, args.draft_k or k)), None
    raise InvalidArgumentError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")


def _token_recycling_settings(args):
    """(tree levels, matrix from --tr-matrix if the file exists) for token_recycling and sam_tr."""
    from spec_jax.drafters.token_recycling import load_matrix

    matrix = load_matrix(args.tr_matrix) if args.tr_matrix and Path(args.tr_matrix).exists() else None
    return _int_list(args.tr_levels, "--tr-levels"), matrix


def apply_budget(args, engine, params, dparams, tok):
    """`--budget N|auto` for drafters with a static tree template: (engine, draft params, report)."""
    import dataclasses

    import numpy as np

    from spec_jax.policies.budget import prune_template
    from spec_jax.trees import rank_prior

    budget = getattr(args, "budget", None)
    if budget in (None, "", "none"):
        return engine, dparams, None
    drafter = engine.drafter
    if not hasattr(drafter, "with_template"):
        raise InvalidArgumentError(f"--budget applies to tree drafters (token_recycling, sam_tr), not {args.method}")
    if str(budget) == "auto":
        from spec_jax.decoding.budget import auto_budget

        calib = [encode_prompt(tok, q, chat=True) for q in CALIBRATION_PROMPTS[:3]]
        engine, report, dparams = auto_budget(engine, params, calib, draft_params=dparams)
        return engine, dparams, report
    try:
        n = int(budget)
    except ValueError:
        raise InvalidArgumentError(f"--budget takes a node count or 'auto', got {budget!r}") from None
    if not 1 <= n <= drafter.num_nodes:
        raise InvalidArgumentError(f"--budget {n} must be between 1 and the template's {drafter.num_nodes} nodes")
    tmpl = drafter.template
    prior = np.array([rank_prior(p) for p in tmpl.paths])  # the order the template itself was built in
    pruned = drafter.with_template(prune_template(tmpl, prior, n))
    return dataclasses.replace(engine, drafter=pruned), dparams, {"nodes": n}


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise InvalidArgumentError(f"{flag} takes comma-separated integers, got {text!r}") from None


def encode_prompt(tok, text: str, chat: bool) -> list[int]:
    if not text:
        raise InvalidArgumentError("empty prompt: pass some text with --prompt")
    if chat:
        return encode_messages(tok, [{"role": "user", "content": text}])
    return tok(text).input_ids


def encode_messages(tok, messages: list[dict]) -> list[int]:
    """A conversation through the model's chat template, ready for the assistant's next turn."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return list(ids)


def cmd_generate(args) -> int:
    from spec_jax.decoding import Engine, generate
    from spec_jax.models.registry import load_model, load_tokenizer
    from spec_jax.sampling import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p)  # validate before loading anything
    if not args.prompt:
        raise InvalidArgumentError("empty prompt: pass some text with --prompt")
    t0 = time.perf_counter()
    _enable_compilation_cache()
    params, cfg = load_model(args.model, args.dtype)
    tok = load_tokenizer(args.model)
    prompt = encode_prompt(tok, args.prompt, args.chat)
    drafter, dparams = build_method(args, params, cfg, tok)
    engine, dparams, budget = apply_budget(args, Engine(cfg, drafter, sampling), params, dparams, tok)
    if budget and not args.json:
        print(f"[budget] {budget['nodes']}-node tree" + (
            f" (depth {budget['depth']}, expected tau {budget['expected_tau']:.2f})" if "depth" in budget else ""),
            file=sys.stderr)

    printed = [""]
    first_token_at = [None]

    def stream(outs):
        if first_token_at[0] is None:
            first_token_at[0] = time.perf_counter() - t0
        text = tok.decode(outs[0], skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    phases = args.json if args.phase_timing is None else args.phase_timing
    gen = generate(engine, params, [prompt], args.max_new_tokens, seed=args.seed, draft_params=dparams,
                   stream=None if args.json else stream, time_phases=phases)
    if args.tr_matrix and args.method in ("token_recycling", "sam_tr"):
        from spec_jax.drafters.token_recycling import save_matrix

        save_matrix(gen.draft_params, args.tr_matrix)
    ids = gen.token_ids[0]
    stats = {"text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids, "method": args.method,
             **gen.stats(), "seconds_total": round(time.perf_counter() - t0, 3)}
    if budget:
        stats["budget"] = {k: v for k, v in budget.items() if k not in ("curve", "cost_seconds")}
    if args.json:
        print(json.dumps(stats))
    else:
        sys.stdout.write(stats["text"][len(printed[0]):] + "\n")
        print(f"[{args.method}] {stats['new_tokens']} tokens in {stats['seconds']:.2f}s "
              f"({stats['tokens_per_second']:.1f} tok/s), tau {stats['tau']:.2f}, "
              f"{stats['target_forwards']} target forwards, first token after "
              f"{first_token_at[0]:.1f}s", file=sys.stderr)
    return 0


def cmd_search_skip(args) -> int:
    from tqdm import tqdm

    from spec_jax.decoding import Engine, generate
    from spec_jax.drafters.layer_skip import save_skip_set, search_skip_set
    from spec_jax.models.registry import load_model, load_tokenizer

    _enable_compilation_cache()
    params, cfg = load_model(args.model, args.dtype)
    tok = load_tokenizer(args.model)
    prompts = [encode_prompt(tok, q, chat=True) for q in CALIBRATION_PROMPTS[: args.num_prompts]]
    # Calibration text is the target's own greedy answers (self-distillation, no external data).
    gen = generate(Engine(cfg), params, prompts, args.calib_tokens)
    seqs = [p + o for p, o in zip(prompts, gen.token_ids, strict=True)]
    L = cfg.num_layers
    with tqdm(total=L + (args.max_skip or L - 1) * 6, desc="skip-set search") as bar:
        result = search_skip_set(params, cfg, seqs, max_skip=args.max_skip, k=args.draft_k,
                                 progress=bar.update)
    path = save_skip_set(result, args.out, str(args.model))
    print(json.dumps({k: result[k] for k in ("skip", "agreement", "predicted_speedup", "beats_ar")}))
    if not result["beats_ar"]:
        print(f"spec-jax: warning: no skip set is predicted to beat autoregressive decoding on this model; "
              f"saved the best one found ({result['predicted_speedup']:.2f}x predicted)", file=sys.stderr)
    print(f"saved to {path}", file=sys.stderr)
    return 0


# Calibration prompts for the skip-set search: varied, short instructions.
CALIBRATION_PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a Python function that checks whether a number is prime.",
    "Give three tips for staying focused while studying.",
    "Summarise the causes of the French Revolution in a paragraph.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short poem about the sea.",
]


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Defaults for `parser` from a YAML file of `option: value` (option names as in --help, - or _)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise InvalidArgumentError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise InvalidArgumentError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"config file {path} must be a mapping of option: value")
    known = {a.dest for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest == "config":
            raise InvalidArgumentError(f"config file {path}: unknown option {key!r}; see --help for the options")
        out[dest] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="spec-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(g)
    add_method_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("--config", help="YAML file of option defaults (configs/)")
    g.add_argument("--phase-timing", action=argparse.BooleanOptionalAction, default=None,
                   help="time drafting and verification separately (one host round trip per step); "
                        "default: on with --json, off otherwise")
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("search-skip", help="search a layer-skip set for --method layer_skip")
    add_model_args(s)
    s.add_argument("--out", required=True, help="where to write the skip-set JSON")
    s.add_argument("--num-prompts", type=int, default=4)
    s.add_argument("--calib-tokens", type=int, default=96, help="target tokens generated per prompt")
    s.add_argument("--max-skip", type=int, default=None)
    s.add_argument("--draft-k", type=int, default=4)
    s.set_defaults(fn=cmd_search_skip)

    b = sub.add_parser("bench", help="benchmark methods against our AR and Hugging Face in one run")
    from spec_jax.bench.run import add_bench_args, cmd_bench

    add_bench_args(b)
    b.set_defaults(fn=cmd_bench)

    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):  # a YAML experiment config supplies defaults; flags still win
            sub_parser = sub.choices[args.command]
            sub_parser.set_defaults(**load_config(args.config, sub_parser))
            args = parser.parse_args(argv)
        return args.fn(args)
    except SpecJaxError as e:
        print(f"spec-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
