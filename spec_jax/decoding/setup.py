"""From command-line options to a ready decoding run: the flags every method declares, the mesh, the engine.

Shared by `spec-jax generate`, `spec-jax bench` and its workers (it sits below both). The method
flags are generated from the method registry (`drafters.registry`): one flag per option name, whose
default is "the method's own", so a new method file brings its flags with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax

from spec_jax.checks import Range
from spec_jax.decoding.budget import RATE_PROMPTS, WARMUP_PROMPTS, apply_budget, parse_budget
from spec_jax.decoding.engine import Engine
from spec_jax.decoding.verify import VERIFY_MODES
from spec_jax.drafters import registry
from spec_jax.errors import InvalidArgumentError, first_line
from spec_jax.files import cache_root
from spec_jax.sampling import Sampling
from spec_jax.sharding import parse_mesh


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs so the second run starts in seconds."""
    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="short name (smollm2-135m), Hugging Face directory or .gguf file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter dtype (float32 is fastest on CPU; bfloat16 for GPU/TPU)")
    m = p.add_argument_group("devices")
    m.add_argument("--mesh", default=None,
                   help="lay the run out over devices: 'data=D,model=M' (batch over D, heads/MLP/vocab over M) "
                        "or 'auto' (every device on model); default: one device")
    m.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (auto-detected on Cloud TPU; "
                        "elsewhere give --coordinator, --num-processes and --process-id)")
    m.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    m.add_argument("--num-processes", type=Range(int, 1), help="processes in the job (with --distributed)")
    m.add_argument("--process-id", type=Range(int, 0), help="this process's index (with --distributed)")


def add_method_args(p: argparse.ArgumentParser, method_flag: bool = True) -> None:
    """`--method` (optional) and every registered method's options, `--budget` and `--verify`."""
    table = registry.methods()
    if method_flag:
        p.add_argument("--method", default="ar", choices=list(table),
                       help="decoding method (`spec-jax methods` describes each)")
    g = p.add_argument_group("method options (each applies to the methods named in its help)")
    for opt, users in registry.all_options().values():
        per_method = {u: next(o.default for o in table[u].options if o.name == opt.name) for u in users}
        distinct = {str(d) for d in per_method.values()}
        shown = f"default {distinct.pop()}" if len(distinct) == 1 else "default: " + "; ".join(
            f"{u} {d}" for u, d in per_method.items())
        text = f"{opt.help} [{', '.join(users)}; {shown}]"
        if opt.type is bool:
            g.add_argument(opt.flag, dest=opt.name, action="store_true", default=None, help=text)
        else:
            g.add_argument(opt.flag, dest=opt.name, type=opt.convert, default=None, choices=opt.choices,
                           help=text)
    g.add_argument("--budget", default=None, type=_budget,
                   help="tree size of methods with a prunable static tree: a node count, or 'auto' to measure this "
                        "device's verification cost and the drafter's acceptance on calibration prompts (once per "
                        "model, device and method: the choice is cached under $SPEC_JAX_CACHE, ~/.cache/spec_jax)")
    g.add_argument("--recalibrate", action="store_true",
                   help="with --budget auto: calibrate again instead of taking the cached choice")
    g.add_argument("--verify", default="lossless", choices=VERIFY_MODES,
                   help="'lossless' (default) or 'typical': Medusa-2's typical acceptance, LOSSY (the output is "
                        "no longer the target's distribution)")


def _budget(text: str) -> str:
    try:
        parse_budget(text)
    except InvalidArgumentError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--budget ")) from None
    return text


MAX_NEW_TOKENS = Range(int, 1)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=256)
    p.add_argument("--temperature", type=Range(float, 0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=Range(int, 0), default=0, help="keep the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=Range(float, 0.0, 1.0, min_open=True), default=1.0,
                   help="nucleus sampling mass (1 = all)")
    p.add_argument("--seed", type=Range(int, 0, 2**31 - 1), default=0)


def method_values(args) -> dict:
    """Option values by name from parsed flags (None: the method's own default)."""
    return {name: getattr(args, name, None) for name in registry.all_options()}


def init_devices(args):
    """Start the multi-host runtime if asked, then the mesh of `--mesh` (None: one device)."""
    if getattr(args, "distributed", False):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs/TPUs ignore it
        kw = {k: v for k, v in (("coordinator_address", args.coordinator), ("num_processes", args.num_processes),
                                ("process_id", args.process_id)) if v is not None}
        try:
            jax.distributed.initialize(**kw)
        except (RuntimeError, ValueError) as e:
            raise InvalidArgumentError(f"--distributed: jax.distributed.initialize failed ({first_line(e)}); give "
                                       "--coordinator host:port, --num-processes and --process-id (auto-detected "
                                       "on Cloud TPU only)") from None
    return parse_mesh(getattr(args, "mesh", None))


def check_devices(args) -> None:
    """The multi-host flags agree (the mesh itself is checked once the devices are known)."""
    n, i = getattr(args, "num_processes", None), getattr(args, "process_id", None)
    if n is not None and i is not None and i >= n:
        raise InvalidArgumentError(f"--process-id {i} is not below --num-processes {n}; processes are numbered "
                                   f"0..{n - 1}")
    if not getattr(args, "distributed", False) and any(
            getattr(args, k, None) is not None for k in ("coordinator", "num_processes", "process_id")):
        raise InvalidArgumentError("--coordinator, --num-processes and --process-id need --distributed")


def check_model(model, dtype: str = "float32"):
    """The model's Config from its header, once its files are known to be there (weights and tokenizer);
    the method checks run against it before any weights are loaded."""
    from spec_jax.models.loading import safetensors_files
    from spec_jax.models.registry import check_tokenizer_files, load_config, resolve

    cfg = load_config(model, dtype)
    check_tokenizer_files(model)
    if resolve(model).is_dir():
        safetensors_files(resolve(model))
    return cfg


def check_method_args(name: str, args, cfg=None) -> list[str]:
    """Validate method `name`'s options (types, ranges, files; against the model's Config when given) and
    the budget before any weights are loaded; returns the flags the user set that the method does not take
    (to warn about)."""
    registry.validate(name, method_values(args), cfg)
    if parse_budget(getattr(args, "budget", None)) is not None and not registry.get(name).prunable:
        takers = [m.name for m in registry.methods().values() if m.prunable]
        raise InvalidArgumentError(f"--budget applies to methods with a prunable static tree ({', '.join(takers)}); "
                                   f"{name} has none")
    own = {o.name for o in registry.get(name).options}
    table = registry.all_options()
    ignored = [table[k][0].flag for k, v in method_values(args).items() if v is not None and k not in own]
    if getattr(args, "recalibrate", False) and parse_budget(getattr(args, "budget", None)) != "auto":
        ignored.append("--recalibrate (it applies to --budget auto)")
    return ignored


def load_target(model, dtype: str, mesh=None, cfg=None) -> registry.Target:
    """Tokenizer (checked against the model's vocabulary first), then the weights into their shards on `mesh`.
    `cfg`: the model's Config when the caller has read it already (`check_model`), so its header (seconds for
    a GGUF file) is not parsed again for the check."""
    from spec_jax.models.registry import check_tokenizer_fits, load_config, load_model, load_tokenizer

    tok = load_tokenizer(model)
    check_tokenizer_fits(tok, cfg if cfg is not None else load_config(model, dtype), model)
    params, cfg = load_model(model, dtype, mesh=mesh)
    return registry.Target(params=params, cfg=cfg, tokenizer=tok, dtype=dtype, mesh=mesh)


@dataclasses.dataclass
class Prepared:
    engine: Engine
    built: registry.Built  # the drafter as built (its tree before any --budget), weights, carry, save hook
    budget: dict | None  # what `--budget` chose, if given


def prepare(name: str, args, target: registry.Target, sampling: Sampling | None = None, batch: int = 1) -> Prepared:
    """Build method `name` from the flags, wrap it in an engine on the target's mesh, size its tree (`--budget`;
    'auto' takes the choice cached for this model, device, method and `batch` size, else calibrates with a
    progress bar, and says so when no tree of the method is expected to beat AR at that batch size: then it decodes
    without one)."""
    from spec_jax.models.registry import model_fingerprint
    from spec_jax.text import calibration_prompts

    built = registry.build(name, method_values(args), target)
    engine = Engine(cfg=target.cfg, drafter=built.drafter, sampling=sampling or Sampling(),
                    verify_mode=getattr(args, "verify", "lossless"), mesh=target.mesh)
    if engine.verify_mode != "lossless" and jax.process_index() == 0:
        print(f"spec-jax: warning: --verify {engine.verify_mode} is LOSSY: the output is not the target "
              "model's greedy text or distribution", file=sys.stderr)
    budget = getattr(args, "budget", None)
    auto = parse_budget(budget) == "auto"
    model = getattr(args, "model", None)
    engine, report = apply_budget(
        engine, budget, target.params, weights=built.weights, carry=built.carry,
        calibration=calibration_prompts(target.tokenizer, (WARMUP_PROMPTS + RATE_PROMPTS) * batch) if auto else None,
        model_id=model_fingerprint(model) if auto and model is not None else None,
        recalibrate=getattr(args, "recalibrate", False), progress=jax.process_index() == 0, batch=batch)
    if report is not None and report.get("nodes") == 0 and jax.process_index() == 0:
        print(f"spec-jax: note: --budget auto decodes {name} without a tree (as --method ar): at batch {batch} its "
              f"best tree ({report['best_tree_nodes']} nodes) is expected to reach "
              f"{report['best_tree_tokens_per_second']:.1f} tokens/s per sequence on this device against AR's "
              f"{report['ar_tokens_per_second']:.1f}, and a tree is kept only when it beats AR by "
              f"{report['ar_margin']:.0%} (verification grows with batch x nodes); a fixed --budget N keeps a tree"
              + ("; the drafter's saved state (e.g. --tr-matrix) is not updated by this run" if built.save else ""),
              file=sys.stderr)
    return Prepared(engine=engine, built=built, budget=report)
