"""`specdecpp`: SpecDec++ (Huang et al. 2024, "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate
Lengths"): a draft model drafts a chain whose length an acceptance-prediction head chooses.

The head reads the draft's last (final-normed) hidden state at a drafted token and gives two logits, reject
and accept (in that order, as the reference implementation): residual blocks x + SiLU(W x + b), then a linear
layer. Drafting stops once the predicted probability that SOME token drafted this step is rejected,
1 - prod_i (1 - r_i), exceeds a threshold (the paper's threshold policy, optimal for its MDP), with the chain
length clamped to [min_k, max_k]. As in the reference implementation (Kaffaljidhmah2/SpecDec_pp,
`hf_generation.py`), the head's prediction for draft token i comes from the forward that feeds token i and
drafts token i + 1, so the decision after drafting token j uses the predictions for tokens 1..j-1 (the first
token's forward reads only verified tokens, so it counts as accepted): no forward is spent on a token only
to judge it. Verification is the standard chain verification; the head only chooses K, so decoding stays
lossless.

The head is trained (`spec_jax.training.acceptance_recipe`) for one draft model; its checkpoint records that
draft (`draft_identity`) and is refused for another.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters import head_checkpoints as hc
from spec_jax.drafters.base import PrefillContext, StepContext
from spec_jax.drafters.chain import ChainDrafter, draft_chain
from spec_jax.drafters.draft_model import DRAFT_OPTIONS, _DraftModelBase, _model_params, check_draft, load_draft
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.models import Config, final_norm, init_cache
from spec_jax.policies import FixedLength, LengthPolicy

HEAD_TYPE = "specdecpp"
REJECT, ACCEPT = 0, 1  # the head's two logits (the reference implementation's class order)


# ----------------------------------------------------------------------------- the head (pure functions)

def init_head(hidden_size: int, num_blocks: int, rng: jax.Array) -> dict:
    """Head parameters (float32): `block_<i>` {kernel [E, E], bias [E]} and `out` {kernel [E, 2], bias [2]},
    initialised as torch's nn.Linear (uniform in +-1/sqrt(E)), as the reference implementation's are."""
    bound = 1 / math.sqrt(hidden_size)
    keys = jax.random.split(rng, 2 * num_blocks + 2)
    u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)  # noqa: E731
    params = {f"block_{i}": {"kernel": u(keys[2 * i], (hidden_size, hidden_size)),
                             "bias": u(keys[2 * i + 1], (hidden_size,))} for i in range(num_blocks)}
    params["out"] = {"kernel": u(keys[-2], (hidden_size, 2)), "bias": u(keys[-1], (2,))}
    return params


def head_shapes(hidden_size: int, num_blocks: int) -> dict[str, tuple[int, ...]]:
    """Flat tensor names -> shapes of a head (what `load_acceptance_head` expects in the file)."""
    out = {"out.kernel": (hidden_size, 2), "out.bias": (2,)}
    for i in range(num_blocks):
        out |= {f"block_{i}.kernel": (hidden_size, hidden_size), f"block_{i}.bias": (hidden_size,)}
    return out


def num_blocks(head: Mapping) -> int:
    return sum(k.startswith("block_") for k in head)


def head_logits(head: Mapping, feats_xE: jax.Array) -> jax.Array:
    """[..., 2] float32 (reject, accept) logits from the draft's final-normed hidden states [..., E]."""
    x = feats_xE.astype(jnp.float32)
    for i in range(num_blocks(head)):  # SpecDec++'s ResBlock: x + SiLU(Linear(x))
        x = x + jax.nn.silu(x @ head[f"block_{i}"]["kernel"] + head[f"block_{i}"]["bias"])
    return x @ head["out"]["kernel"] + head["out"]["bias"]


def reject_prob(head: Mapping, feats_xE: jax.Array) -> jax.Array:
    """[...] predicted probability that the token whose features these are is rejected."""
    return jax.nn.softmax(head_logits(head, feats_xE), axis=-1)[..., REJECT]


def weighted_bce(logits_Nx2: jax.Array, accept_N: jax.Array, mask_N: jax.Array, reject_weight: float) -> jax.Array:
    """SpecDec++'s class-weighted binary cross-entropy against soft labels (the probability a token is accepted):

        sum_n w_rej (1 - y_n) (-log P_rej) + y_n (-log P_acc)  /  sum_n w_rej (1 - y_n) + y_n

    over the masked positions: torch's weighted CrossEntropyLoss applied to both classes and mixed by the soft
    label, normalised by the label-weighted class weights, as the reference `compute_loss` does."""
    logp_Nx2 = jax.nn.log_softmax(logits_Nx2.astype(jnp.float32), axis=-1)
    y_N, m_N = accept_N.astype(jnp.float32), mask_N.astype(jnp.float32)
    w_rej_N = reject_weight * (1 - y_N) * m_N
    w_acc_N = y_N * m_N
    loss = -(w_rej_N * logp_Nx2[..., REJECT] + w_acc_N * logp_Nx2[..., ACCEPT]).sum()
    return loss / jnp.maximum((w_rej_N + w_acc_N).sum(), 1e-9)


def acceptance_stop(reject_fn: Callable, threshold: float, min_k: int) -> Callable:
    """A `draft_chain` stop rule: stop after draft token i (0-based) once 1 - prod (1 - r) over the earlier
    drafts exceeds `threshold`, never before `min_k` drafts. `reject_fn(features_BxE) -> [B]` is the predicted
    rejection probability of the token the features were computed at; the carry is prod (1 - r), [B]."""
    def stop_fn(i, feats_BxE, accept_all_B):
        # The features at i = 0 are the root's (a verified token): nothing drafted yet to be rejected.
        r_B = jnp.where(i > 0, reject_fn(feats_BxE), 0.0)
        accept_all_B = accept_all_B * (1 - r_B)
        return (1 - accept_all_B > threshold) & (i + 1 >= min_k), accept_all_B
    return stop_fn


# ----------------------------------------------------------------------------- checkpoints

def draft_identity(draft_params: Mapping, dcfg: Config) -> dict:
    """What a head records of the draft it was trained for: the draft's shape and a fingerprint of its own
    weights (decoder layers and final norm; `head_checkpoints.weights_fingerprint`)."""
    own = {k: v for k, v in draft_params.items() if k.startswith("layers_") or k == "norm"}
    return {"num_layers": dcfg.num_layers, "hidden_size": dcfg.hidden_size, "vocab_size": dcfg.vocab_size,
            "sha256": hc.weights_fingerprint(own)}


def save_acceptance_head(path: str | os.PathLike, head: Mapping, meta: Mapping, draft: Mapping) -> Path:
    """Write a head (float16: a few MB) with the draft it was trained for (`draft_identity`) and `meta`
    (`heads_meta(target cfg, ...)`)."""
    return hc.save_heads(path, HEAD_TYPE, head, {**meta, "num_blocks": num_blocks(head), "draft": dict(draft)},
                         dtype=np.float16)


def load_acceptance_head(path: str | os.PathLike, cfg: Config, draft: Mapping | None = None, *,
                         mesh=None) -> tuple[dict, dict]:
    """(head params, config) of a head saved by `save_acceptance_head`, checked against the target model and,
    when `draft` (`draft_identity` of the draft it will run with) is given, against the draft it was trained
    for."""
    config = hc.read_heads_config(path, cfg, HEAD_TYPE, {"num_blocks": int, "draft": dict})
    trained = config["draft"]
    if draft is not None and any(trained.get(k) != v for k, v in draft.items()):
        diff = ", ".join(f"{k} {trained.get(k)!r} vs {v!r}" for k, v in draft.items() if trained.get(k) != v)
        raise DataFormatError(f"{path}: this acceptance head was trained for another draft model ({diff}, head vs "
                              "this draft); train one for this draft (recipe specdecpp with acc_draft_model naming "
                              "it) or choose the draft it was trained for")
    if not isinstance(trained.get("hidden_size"), int) or trained["hidden_size"] < 1:
        raise DataFormatError(f"{path}: its config's draft.hidden_size must be a positive integer")
    return hc.load_heads(path, cfg, HEAD_TYPE, lambda c: head_shapes(trained["hidden_size"], c["num_blocks"]),
                         required={"num_blocks": int, "draft": dict}, mesh=mesh)


# ----------------------------------------------------------------------------- the drafter

@dataclasses.dataclass(frozen=True)
class SpecDecPP(_DraftModelBase, ChainDrafter):
    """The draft model drafts a chain of at most `policy.k` (max K) tokens; the acceptance head stops it.

    weights: {"draft": the draft model's params (with "vocab" for --draft-vocab), "head": the head's}."""

    draft_cfg: Config = None
    policy: LengthPolicy = FixedLength(20)
    threshold: float = 0.3
    min_k: int = 2
    name = "specdecpp"

    def __post_init__(self):
        if not 0 < self.threshold < 1 or not 1 <= self.min_k <= self.policy.k:
            raise InvalidArgumentError(f"specdecpp: need 0 < stop threshold < 1 and 1 <= min K <= max K, got "
                                       f"threshold {self.threshold}, K in [{self.min_k}, {self.policy.k}]")

    def check(self, cfg: Config, weights, carry) -> None:
        if not isinstance(weights, Mapping) or not {"draft", "head"} <= set(weights):
            raise TypeError("the specdecpp drafter needs weights {'draft': draft params, 'head': head params}")
        super().check(cfg, weights["draft"], carry)
        got = {k: tuple(np.shape(v)) for k, v in hc.flat_names(weights["head"]).items()}
        want = head_shapes(self.draft_cfg.hidden_size, num_blocks(weights["head"]))
        if got != want:
            raise DataFormatError(f"acceptance head tensors {got} do not fit a draft of hidden size "
                                  f"{self.draft_cfg.hidden_size} (expected {want})")

    def init(self, weights, carry, cfg, batch, cache_size):
        return {"cache": init_cache(self.draft_cfg, batch, cache_size), "policy": self.policy.init(batch)}

    def prefill(self, weights, state, ctx: PrefillContext):
        return super().prefill(weights["draft"], state, ctx)

    def _feature_step(self, draft):
        """model_step returning the draft's logits, cache and final-normed hidden state of the last token."""
        def model_step(cache, tokens_BxT, positions_BxT):
            last = jnp.full((tokens_BxT.shape[0], 1), tokens_BxT.shape[1] - 1, jnp.int32)
            logits, cache, h = self._forward_hidden(draft, tokens_BxT, positions_BxT,
                                                    cache.replace(lengths=positions_BxT[:, 0]), logits_at=last)
            return logits[:, 0], cache, final_norm(_model_params(draft), self.draft_cfg, h[:, 0])
        return model_step

    def propose(self, weights, state, ctx: StepContext):
        first_Bx2, positions_Bx2 = self._root_inputs(ctx)
        stop = acceptance_stop(lambda f: reject_prob(weights["head"], f), self.threshold, self.min_k)
        tree, cache = draft_chain(self._feature_step(weights["draft"]), state["cache"], first_Bx2, positions_Bx2,
                                  self.policy, state["policy"], ctx.sampling, ctx.rng, stop_fn=stop,
                                  stop_carry=jnp.ones(first_Bx2.shape[:1], jnp.float32))
        return tree, {**state, "cache": cache}, ctx.cache


# ----------------------------------------------------------------------------- registry

OPTIONS = (
    *DRAFT_OPTIONS,
    Option("acceptance_head", str, None, "acceptance-prediction head directory (recipe specdecpp); default: the "
           "head shipped for the target when it was trained for this draft, else an untrained head (still "
           "lossless, but its stop points are arbitrary)"),
    Option("stop_threshold", float, 0.3, "stop drafting once the predicted probability that some draft of "
           "this step is rejected exceeds this", min=0.0, max=1.0),
    Option("min_k", int, 2, "draft at least this many tokens per step", min=1),
    Option("max_k", int, 20, "draft at most this many tokens per step (the verified chain's length)", min=1),
)


def head_dir(opts, cfg: Config) -> Path | None:
    """`--acceptance-head`, checked to hold a head for this model (no weights read), else the shipped head (None
    when none ships for this model)."""
    path = hc.given_dir(opts.acceptance_head, "--acceptance-head", "a directory written by the specdecpp recipe")
    if path is None:
        return hc.shipped_heads(cfg, HEAD_TYPE)
    hc.read_heads_config(path, cfg, HEAD_TYPE, {"num_blocks": int, "draft": dict})
    return path


def _check(opts, cfg: Config) -> None:
    if opts.min_k > opts.max_k:
        raise InvalidArgumentError(f"--min-k {opts.min_k} > --max-k {opts.max_k}")
    if not 0 < opts.stop_threshold < 1:
        raise InvalidArgumentError(f"--stop-threshold {opts.stop_threshold}: must be strictly between 0 and 1")
    check_draft(opts, cfg)
    head_dir(opts, cfg)


@register("specdecpp", "SpecDec++: the draft model drafts a chain until an acceptance-prediction head expects a "
          "rejection", options=OPTIONS, check=_check)
def build(opts, target) -> Built:
    draft, dcfg = load_draft(opts, target)
    path, identity = head_dir(opts, target.cfg), draft_identity(draft, dcfg)
    trained = path and hc.read_heads_config(path, target.cfg, HEAD_TYPE)["draft"]
    if opts.acceptance_head is not None or (trained and all(trained.get(k) == v for k, v in identity.items())):
        head, _ = load_acceptance_head(path, target.cfg, identity, mesh=target.mesh)
    else:  # no head for this draft: an untrained one, as other trained methods fall back to untrained weights
        print("spec-jax: warning: no acceptance head trained for this draft model (give --acceptance-head, or train "
              "one with recipe: specdecpp); its stop points are arbitrary (decoding stays lossless)", file=sys.stderr)
        head = hc.place(jax.tree.map(np.asarray, init_head(dcfg.hidden_size, 3, jax.random.key(0))), target.mesh)
    drafter = SpecDecPP(draft_cfg=dcfg, policy=FixedLength(opts.max_k), threshold=opts.stop_threshold,
                        min_k=opts.min_k)
    return Built(drafter, weights={"draft": draft, "head": head})
