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

METHODS = ("ar", "draft", "layer_skip")


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
    p.add_argument("--draft-model", help="draft model for --method draft (name, HF dir or .gguf); "
                   "default: the target's first --draft-layers layers as a stand-in")
    p.add_argument("--draft-layers", type=int, default=8,
                   help="layers of the stand-in early-exit draft model (when --draft-model is not given)")
    p.add_argument("--draft-k", type=int, default=None, help="maximum draft length (default 5; 4 for layer_skip)")
    p.add_argument("--length-policy", default="fixed", choices=["fixed", "heuristic", "svip"],
                   help="draft-length policy for chain drafters")
    p.add_argument("--skip-file", help="skip-set JSON written by `spec-jax search-skip` (layer_skip)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def build_method(args, params, cfg, target_tok=None):
    """(drafter, draft params) for `--method`."""
    from spec_jax.drafters import Drafter
    from spec_jax.drafters.draft_model import DraftModel
    from spec_jax.drafters.layer_skip import LayerSkip, load_skip_set
    from spec_jax.models import truncate
    from spec_jax.models.registry import check_same_tokenizer, load_model, load_tokenizer
    from spec_jax.policies import make_policy

    if args.method == "ar":
        return Drafter(), None
    if args.method == "draft":
        policy = make_policy(args.length_policy, args.draft_k or 5)
        if args.draft_model:
            dparams, dcfg = load_model(args.draft_model, args.dtype)
            check_same_tokenizer(target_tok, load_tokenizer(args.draft_model), cfg, dcfg)
        else:
            dparams, dcfg = truncate(params, cfg, args.draft_layers)
        return DraftModel(draft_cfg=dcfg, policy=policy), dparams
    if args.method == "layer_skip":
        if not args.skip_file:
            raise InvalidArgumentError("--method layer_skip needs --skip-file; create one with "
                                       "`spec-jax search-skip --out skip.json`")
        return LayerSkip(skip=load_skip_set(args.skip_file, cfg),
                         policy=make_policy(args.length_policy, args.draft_k or 4)), None
    raise InvalidArgumentError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")


def encode_prompt(tok, text: str, chat: bool) -> list[int]:
    if not text:
        raise InvalidArgumentError("empty prompt: pass some text with --prompt")
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    return tok(text).input_ids


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
    engine = Engine(cfg, drafter, sampling)

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

    gen = generate(engine, params, [prompt], args.max_new_tokens, seed=args.seed, draft_params=dparams,
                   stream=None if args.json else stream)
    ids = gen.token_ids[0]
    stats = {"text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids, "method": args.method,
             **gen.stats(), "seconds_total": round(time.perf_counter() - t0, 3)}
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
    print(json.dumps({k: result[k] for k in ("skip", "agreement", "predicted_speedup")}))
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
        return args.fn(args)
    except SpecJaxError as e:
        print(f"spec-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
