"""`early_exit`: self-speculative decoding by exiting after the target's first n layers (LayerSkip, Elhoushi
et al. 2024; EESD, Liu et al. 2024).

Drafting: the target's own layers 0..n-1 run one token at a time (`draft_chain`); the exit head, an optional
trained adapter followed by the shared final norm and LM head, reads the exit hidden state h_n and proposes the
next token. Those drafting forwards write the K/V of layers < n for the root and every drafted token at their
final cache slots (a chain's slot is its position), and keep h_n of [root, d1..dK]; one more partial forward
feeds the last drafted token. Verification (`verify_forward`) then runs only layers n..L-1, starting from the
cached h_n, so the early layers are not recomputed for drafted tokens: LayerSkip's self-speculation reuses the
draft's KV cache and exit states (its §4.2; the HF port recomputes them). Accepted tokens keep the entries
written while drafting, so after the commit the cache is the one a full forward over them would leave.

The adapter (one per trained exit, `init_adapters`) is a residual low-rank MLP on the exit state,
h + up(silu(down(rmsnorm(h)))), whose `up` starts at zero: an untrained adapter is plain early exit. It is
trained by self-distillation from the final layer (`spec_jax.training.exit_recipe`); the target's layers stay
frozen, since the verification reuses what they compute. Adapters ship as one heads directory
(`head_checkpoints`, head type "early_exit") holding every trained exit. `search_exit` picks the exit layer and
draft length by measured speed; `save_exit_choice` keeps the pick for `--exit-file`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters import head_checkpoints as hc
from spec_jax.drafters import vocab as dv
from spec_jax.drafters.base import DraftShape, StepContext
from spec_jax.drafters.chain import LENGTH_POLICY, ChainDrafter, draft_chain
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.files import atomic_write_text
from spec_jax.models import Config, KVCache, final_norm, forward, forward_embeddings, init_cache, lm_head
from spec_jax.policies import FixedLength, LengthPolicy, make_policy

HEAD_TYPE = "early_exit"
DEFAULT_K = 4


def exit_range(cfg: Config) -> tuple[int, int]:
    """The valid exit layers [1, L-1]: an exit after all L layers is the target itself."""
    return 1, cfg.num_layers - 1


def check_exit_layer(n: int, cfg: Config, what: str = "--exit-layer") -> None:
    """Refuse an exit layer outside the model, naming the valid range."""
    lo, hi = exit_range(cfg)
    if isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi:
        raise InvalidArgumentError(f"{what} {n}: outside this {cfg.num_layers}-layer model; give an exit layer "
                                   f"in [{lo}, {hi}] (the number of target layers the draft runs)")


# ----------------------------------------------------------------------------- the exit head (pure functions)

def init_adapter(cfg: Config, rank: int, rng: jax.Array) -> dict:
    """One exit's adapter: `norm` [E] (ones), `down` [E, r] (scaled normal) and `up` [r, E] (zeros: identity)."""
    E = cfg.hidden_size
    return {"norm": jnp.ones((E,), jnp.float32),
            "down": jax.random.normal(rng, (E, rank), jnp.float32) / math.sqrt(E),
            "up": jnp.zeros((rank, E), jnp.float32)}


def init_adapters(cfg: Config, exit_layers: Sequence[int], rank: int, rng: jax.Array) -> dict:
    """`{"exit_<n>": adapter}` for each exit layer n (zero-initialised: plain early exit)."""
    keys = jax.random.split(rng, len(exit_layers))
    return {f"exit_{n}": init_adapter(cfg, rank, k) for n, k in zip(exit_layers, keys, strict=True)}


def adapt(adapter: dict | None, cfg: Config, h_BxE: jax.Array) -> jax.Array:
    """The exit state after the adapter: h + up(silu(down(rmsnorm(h)))) (h itself without an adapter)."""
    if adapter is None:
        return h_BxE
    x = final_norm({"norm": {"weight": adapter["norm"]}}, cfg, h_BxE.astype(jnp.float32))
    delta = jax.nn.silu(x @ adapter["down"]) @ adapter["up"]
    return (h_BxE.astype(jnp.float32) + delta).astype(h_BxE.dtype)


def exit_logits(adapter: dict | None, target_params, cfg: Config, h_BxE: jax.Array,
                vocab: dict | None = None) -> jax.Array:
    """Float32 logits of exit states: adapter, the target's final norm, then its LM head (or the reduced
    vocabulary's rows of it: [..., Vd])."""
    normed = final_norm(target_params, cfg, adapt(adapter, cfg, h_BxE))
    return lm_head(target_params, cfg, normed) if vocab is None else dv.vocab_logits(vocab, normed)


def _write_at(buf_BxSxE: jax.Array, new_BxTxE: jax.Array, starts_B: jax.Array) -> jax.Array:
    """Each sequence's new rows written at its own offset."""
    return jax.vmap(lambda b, x, s: jax.lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), s, 0))(
        buf_BxSxE, new_BxTxE, starts_B)


# ----------------------------------------------------------------------------- the drafter

@dataclasses.dataclass(frozen=True)
class EarlyExit(ChainDrafter):
    """Drafts a chain with the target's first `exit_layer` layers; verification reuses their K/V and exit states.

    Weights: `{"adapter": ...}` (one exit's, optional) and `{"vocab": ...}` (a reduced draft vocabulary,
    optional); `{}` is plain early exit.
    """

    exit_layer: int = 1
    policy: LengthPolicy = FixedLength(DEFAULT_K)
    name = "early_exit"

    @property
    def shape(self) -> DraftShape:
        # Root and the K drafts are fed through layers < n, leaving their K/V at slots committed..committed+K.
        k = self.policy.k
        return DraftShape(nodes=k, depth=k, target_scratch=k + 1)

    def check(self, cfg: Config, weights, carry) -> None:
        check_exit_layer(self.exit_layer, cfg, "exit layer")
        weights = weights or {}
        adapter = weights.get("adapter")
        if adapter is not None:
            shapes = {k: tuple(np.shape(v)) for k, v in adapter.items()}
            r = shapes.get("down", (0, 0))[1]
            want = {"norm": (cfg.hidden_size,), "down": (cfg.hidden_size, r), "up": (r, cfg.hidden_size)}
            if shapes != want:
                raise InvalidArgumentError(f"early_exit: adapter of shapes {shapes} does not fit this model "
                                           f"(hidden size {cfg.hidden_size}); expected {want}")
        dv.check_weights(weights.get("vocab"), cfg, 1, self.name)

    def init(self, weights, carry, cfg, batch, cache_size):
        hidden = jnp.zeros((batch, self.policy.k + 1, cfg.hidden_size), cfg.jnp_dtype)
        return {"policy": self.policy.init(batch), "exit_hidden": hidden}

    def propose(self, weights, state, ctx: StepContext):
        weights = weights or {}
        cfg, committed_B = ctx.cfg, ctx.committed_B
        adapter, vocab = weights.get("adapter"), weights.get("vocab")
        early = tuple(range(self.exit_layer))

        def exit_forward(carry, tokens_BxT, positions_BxT):
            cache, hid = carry
            out = forward(ctx.target_params, cfg, tokens_BxT, positions_BxT, cache.replace(lengths=positions_BxT[:, 0]),
                          layers=early, compute_logits=False)
            hid = _write_at(hid, out.final_hidden, positions_BxT[:, 0] - committed_B)
            return (out.cache.replace(lengths=committed_B), hid), out.final_hidden[:, -1]

        def model_step(carry, tokens_BxT, positions_BxT):
            carry, h_BxE = exit_forward(carry, tokens_BxT, positions_BxT)
            logits = exit_logits(adapter, ctx.target_params, cfg, h_BxE, vocab)
            return (logits if vocab is None else dv.full_vocab_logits(vocab, logits, cfg.vocab_size)), carry

        tree, carry = draft_chain(model_step, (ctx.cache, state["exit_hidden"]), ctx.pending_B[:, None],
                                  committed_B[:, None], self.policy, state["policy"], ctx.sampling, ctx.rng)
        # The chain loop fed every draft but the last one it drew (at index `drawn` - 1 for every sequence);
        # feed that one too, so verification has h_n and early-layer K/V of all of [root, d1..dK].
        drawn = jnp.max(jnp.sum(tree.valid, axis=1))
        last_Bx1 = jax.lax.dynamic_slice_in_dim(tree.tokens, drawn - 1, 1, axis=1)
        (cache, hid), _ = exit_forward(carry, last_Bx1, (committed_B + drawn)[:, None])
        return tree, {**state, "exit_hidden": hid}, cache

    def verify_forward(self, weights, state, params, cfg: Config, inputs_BxT, positions_BxT, cache: KVCache,
                       mask_BxTxT, return_hidden: tuple[int, ...], logits_at=None):
        """Layers n..L-1 only, from the exit states `propose` kept (LayerSkip's KV and exit-state reuse)."""
        if any(0 <= i <= self.exit_layer for i in return_hidden):
            raise InvalidArgumentError(f"early_exit verifies from layer {self.exit_layer}: hidden states "
                                       f"{sorted(return_hidden)} of the early layers are not computed")
        return forward_embeddings(params, cfg, state["exit_hidden"], positions_BxT, cache, mask_BxTxT,
                                  layers=tuple(range(self.exit_layer, cfg.num_layers)), return_hidden=return_hidden,
                                  logits_at=logits_at)


# ----------------------------------------------------------------------------- checkpoints

def save_exit_heads(path: str | os.PathLike, params: dict, meta: dict, rank: int,
                    ranking: np.ndarray | None = None, dtype=np.float16) -> Path:
    """Write trained adapters (`{"exit_<n>": adapter}`) with their exit layers and rank (float16 by default)."""
    exits = sorted(int(k.removeprefix("exit_")) for k in params)
    return hc.save_heads(path, HEAD_TYPE, params, {**meta, "exit_layers": exits, "rank": rank}, ranking, dtype=dtype)


def read_exit_config(path: str | os.PathLike, cfg: Config) -> dict:
    """An adapters directory's config, refused unless it is early-exit adapters for this model with valid exits."""
    config = hc.read_heads_config(path, cfg, HEAD_TYPE, {"rank": int, "exit_layers": list})
    exits = config["exit_layers"]
    lo, hi = exit_range(cfg)
    if not exits or any(isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi for n in exits):
        raise DataFormatError(f"{path}: exit_layers {exits} must be layer counts in [{lo}, {hi}]")
    return config


def load_exit_adapter(path: str | os.PathLike, cfg: Config, exit_layer: int, mesh=None) -> dict:
    """The adapter of exit `exit_layer` from a `save_exit_heads` directory (float32)."""
    config = read_exit_config(path, cfg)
    if exit_layer not in config["exit_layers"]:
        raise InvalidArgumentError(f"--exit-head {path}: has adapters for exits {config['exit_layers']}, not "
                                   f"{exit_layer}; pick one of those or --exit-head none (plain early exit)")
    E = cfg.hidden_size

    def shapes(c):
        r = c["rank"]
        return {f"exit_{n}.{k}": s for n in c["exit_layers"]
                for k, s in (("norm", (E,)), ("down", (E, r)), ("up", (r, E)))}

    params, _ = hc.load_heads(path, cfg, HEAD_TYPE, shapes, required={"rank": int, "exit_layers": list}, mesh=mesh)
    return params[f"exit_{exit_layer}"]


# ----------------------------------------------------------------------------- the exit choice (`--exit-file`)

def save_exit_choice(result: dict, path: str | os.PathLike, model: str) -> Path:
    """Write a `search_exit` result as JSON (atomically)."""
    return atomic_write_text(path, json.dumps({"model": model, **result}, indent=2))


def load_exit_choice(path: str | os.PathLike, cfg: Config) -> tuple[int, int]:
    """(exit layer, draft length) from a `save_exit_choice` file, checked against the model."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such exit file; create one with `spec-jax search-exit`")
    try:
        data = json.loads(path.read_bytes())
        n, k = data["exit_layer"], data.get("k", DEFAULT_K)
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (n, k)):
            raise ValueError(f"exit_layer and k must be integers, got {n!r} and {k!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataFormatError(f"{path}: not an exit file ({e}); expected JSON with 'exit_layer' and 'k'") from None
    if data.get("num_layers", cfg.num_layers) != cfg.num_layers:
        raise DataFormatError(f"{path}: chosen for a {data['num_layers']}-layer model, this model has "
                              f"{cfg.num_layers} layers")
    lo, hi = exit_range(cfg)
    if not lo <= n <= hi:
        raise DataFormatError(f"{path}: exit layer {n} is outside this model's valid exits [{lo}, {hi}]")
    if k < 1:
        raise DataFormatError(f"{path}: draft length k must be >= 1, got {k}")
    return n, k


# ----------------------------------------------------------------------------- exit search

def exit_agreement(params, cfg: Config, calibration: list[list[int]], exits: Sequence[int],
                   adapters: dict | None = None, vocab: dict | None = None) -> dict[int, float]:
    """Per exit, the share of positions where the exit head's argmax equals the full model's (teacher-forced
    on the calibration sequences): the greedy acceptance rate of one drafted token."""
    T = max(map(len, calibration))
    toks = np.zeros((len(calibration), T), np.int32)
    mask = np.zeros((len(calibration), T), bool)
    for i, c in enumerate(calibration):
        toks[i, : len(c)], mask[i, : len(c)] = c, True
    B = len(calibration)
    out = jax.jit(lambda p, t: forward(p, cfg, t, jnp.broadcast_to(jnp.arange(T), (B, T)), init_cache(cfg, B, T),
                                       return_hidden=tuple(exits)))(params, jnp.asarray(toks))
    full_top1 = np.asarray(jnp.argmax(out.logits, -1))
    result = {}
    for n in exits:
        adapter = (adapters or {}).get(n)
        logits = jax.jit(lambda h, a: exit_logits(a, params, cfg, h, vocab))(out.hidden[n], adapter)
        top1 = np.asarray(jnp.argmax(logits, -1))
        if vocab is not None:
            top1 = np.asarray(vocab["d2t"])[top1]
        result[n] = float(np.sum((top1 == full_top1) & mask) / np.sum(mask))
    return result


def expected_tokens(a: float, k: int) -> float:
    """Tokens a chain of k drafts commits per step at per-token acceptance a (with the bonus token)."""
    a = min(a, 0.999999)
    return (1 - a ** (k + 1)) / (1 - a)


def _time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / repeats


def step_costs(params, cfg: Config, n: int, k: int, vocab: dict | None = None, context: int = 256) -> dict:
    """Measured seconds of one step's parts at exit n and draft length k (one sequence, `context` tokens
    cached): a partial forward through layers < n, an exit head, and the verification of k + 1 tokens
    through layers n..L-1 and the LM head."""
    cache = init_cache(cfg, 1, context + k + 8).replace(lengths=jnp.full((1,), context, jnp.int32))
    tok = jnp.ones((1, 1), jnp.int32)
    pos = jnp.full((1, 1), context, jnp.int32)
    partial = jax.jit(lambda p, c: forward(p, cfg, tok, pos, c, layers=tuple(range(n)), compute_logits=False)
                      .final_hidden)
    h = partial(params, cache)
    head = jax.jit(lambda p, x: exit_logits(None, p, cfg, x[:, -1], vocab))
    T = k + 1
    hT = jnp.broadcast_to(h, (1, T, cfg.hidden_size))
    posT = context + jnp.arange(T)[None]
    verify = jax.jit(lambda p, c: forward_embeddings(p, cfg, hT, posT, c, layers=tuple(range(n, cfg.num_layers)))
                     .logits)
    return {"partial": _time(partial, params, cache), "head": _time(head, params, h),
            "verify": _time(verify, params, cache)}


def ar_seconds(params, cfg: Config, context: int = 256) -> float:
    """Measured seconds of one autoregressive step (every layer and the LM head, one token)."""
    cache = init_cache(cfg, 1, context + 8).replace(lengths=jnp.full((1,), context, jnp.int32))
    step = jax.jit(lambda p, c: forward(p, cfg, jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), context, jnp.int32),
                                        c).logits)
    return _time(step, params, cache)


def predicted_speed(a: float, k: int, costs: dict) -> float:
    """Tokens per second of a step: k + 1 partial forwards (the last draft fed too), k exit heads, one
    upper-layer verification."""
    seconds = (k + 1) * costs["partial"] + k * costs["head"] + costs["verify"]
    return expected_tokens(a, k) / seconds


def rank_exits(params, cfg: Config, calibration: list[list[int]], exits: Sequence[int], adapters: dict,
               *, max_k: int = 6, vocab: dict | None = None, progress=None) -> list[dict]:
    """Every (exit, k) candidate scored by measured parts: the exit's greedy agreement on the calibration text
    (with its adapter, when `adapters` has one) and this device's measured seconds of a step's parts
    (`step_costs`; the verification at k = 1 and `max_k`, interpolated between); best predicted speed first,
    `predicted_speedup` against a measured full forward (AR)."""
    agreement = exit_agreement(params, cfg, calibration, exits, adapters, vocab)
    ar = ar_seconds(params, cfg)
    rows = []
    for n in exits:
        lo, hi = step_costs(params, cfg, n, 1, vocab), step_costs(params, cfg, n, max_k, vocab)
        for k in range(1, max_k + 1):
            w = (k - 1) / max(max_k - 1, 1)
            costs = {**lo, "verify": (1 - w) * lo["verify"] + w * hi["verify"]}
            speed = predicted_speed(agreement[n], k, costs)
            rows.append({"exit_layer": n, "k": k, "agreement": round(agreement[n], 4),
                         "predicted_speedup": round(speed * ar, 3), "adapter": n in adapters})
        if progress:
            progress()
    return sorted(rows, key=lambda r: -r["predicted_speedup"])


# ----------------------------------------------------------------------------- the method

def head_dir(opts, cfg: Config) -> Path | None:
    """`--exit-head` (a directory, or 'none'), else the shipped adapters for this model, else None."""
    if opts.exit_head == "none":
        return None
    path = hc.given_dir(opts.exit_head, "--exit-head", "trained early-exit adapters or 'none'")
    return path if path is not None else hc.shipped_heads(cfg, HEAD_TYPE)


def settings(opts, cfg: Config) -> tuple[int, int, Path | None]:
    """(exit layer, draft length, adapters directory or None) from the options, the exit file and the adapters'
    own defaults, everything checked against the model before any weights load."""
    choice = load_exit_choice(opts.exit_file, cfg) if opts.exit_file else None
    heads = head_dir(opts, cfg)
    config = read_exit_config(heads, cfg) if heads is not None else {}
    n = opts.exit_layer or (choice[0] if choice else None) or config.get("default_exit") or max(
        1, cfg.num_layers // 2)
    check_exit_layer(n, cfg)
    if heads is not None and n not in config["exit_layers"]:
        if opts.exit_head is not None:
            raise InvalidArgumentError(f"--exit-head {heads}: has adapters for exits {config['exit_layers']}, not "
                                       f"{n}; pick one of those with --exit-layer, or --exit-head none")
        heads = None  # the shipped adapters do not cover this exit: plain early exit
    k = opts.draft_k or (choice[1] if choice else None) or config.get("default_k") or DEFAULT_K
    dv.check_option(opts.draft_vocab, cfg, heads)
    return n, k, heads


def _check(opts, cfg: Config) -> None:
    settings(opts, cfg)


@register("early_exit", "self-speculative: the target's first n layers draft through an exit head (LayerSkip); "
          "verification reuses their KV cache and exit states (`spec-jax search-exit`)",
          options=(Option("exit_layer", int, None, "exit after this many target layers (default: --exit-file's, "
                          "else the adapters' default, else half the layers)", min=1),
                   Option("exit_file", str, None, "exit choice written by `spec-jax search-exit`", path="read"),
                   Option("exit_head", str, None, "trained exit adapters (default: those shipped for this model "
                          "when they cover the exit; 'none': plain early exit)"),
                   Option("draft_k", int, None, "maximum draft length (default: --exit-file's, else the adapters' "
                          "default, else 4)", min=1),
                   LENGTH_POLICY, dv.VOCAB_OPTION), check=_check)
def build(opts, target) -> Built:
    n, k, heads = settings(opts, target.cfg)
    weights = {} if heads is None else {"adapter": load_exit_adapter(heads, target.cfg, n, target.mesh)}
    weights = dv.with_vocab(weights, opts.draft_vocab, target, heads)
    return Built(EarlyExit(exit_layer=n, policy=make_policy(opts.length_policy, k)), weights=weights)
