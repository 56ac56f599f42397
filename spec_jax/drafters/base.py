"""The drafter contract: the one interface every drafter implements, and the records the engine hands it.

A drafter is a frozen (hashable) dataclass of static settings; it is a jit static argument. What it
works with comes in three separate pytrees:

- `weights`: trained, frozen parameters (a draft model, draft heads); never changed by decoding;
- `carry`: state carried from one request to the next (Token Recycling's matrix: a hot start); it
  enters through `init` and leaves through `carry_out`;
- `state`: the per-run state pytree (caches, pools, policy state), created by `init`.

The engine calls, inside its jitted functions (so everything must be traceable):

    state = init(weights, carry, cfg, batch, cache_size)
    state = prefill(weights, state, PrefillContext)                  # after the target read the prompt
    tree, state, target_cache = propose(weights, state, StepContext)  # every step
    output = verify_forward(weights, state, ...)                      # the target over [root, nodes]
    state = observe(weights, state, StepResult)                       # after verification and commit

`shape` is the single source of truth for the static bounds of what `propose` does: the number of tree
nodes N (every proposed `DraftTree` is `[B, N]`), the deepest node, and the number of target-cache
scratch slots past the committed length that `propose` may write (a self-speculative drafter runs the
target's own layers and leaves K/V there; verification overwrites them). The engine sizes the cache from
it and, before compiling the step, runs `propose` once on a small probe (a program of its own) to check
that the drafter keeps to it; a drafter that writes more scratch than it declares is refused (see
`engine.audit_drafter`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.errors import DataFormatError, InvalidArgumentError, first_line
from spec_jax.models import Config, KVCache, forward
from spec_jax.sampling import Sampling
from spec_jax.trees import DraftTree, TreeTemplate


def load_int_array(path, ndim: int, what: str, hint: str = "") -> np.ndarray:
    """A drafter's integer array from a .npy file (matrix, token ids), refused clearly when it is not one."""
    path = Path(path)
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataFormatError(f"{path}: not a {what} ({first_line(e)}){hint}") from None
    if not isinstance(a, np.ndarray):  # an .npz archive
        a.close()
        raise DataFormatError(f"{path}: an .npz archive, not a {what} (.npy){hint}")
    if a.ndim != ndim or a.dtype.kind not in "iu":
        raise DataFormatError(f"{path}: expected a {ndim}-D integer {what}, got {a.dtype} {a.shape}")
    return a


@dataclasses.dataclass(frozen=True)
class DraftShape:
    """Static bounds of what a drafter's `propose` does; the engine compiles and sizes buffers from them."""

    nodes: int  # N: nodes of every proposed tree
    depth: int  # the deepest node's depth (verification walks this many levels)
    target_scratch: int = 0  # target-cache slots past the committed length that `propose` writes
    # Nodes verification may accept: the first `verified` (None: all N). The others are fed only for what
    # they leave behind (K/V, the logits `observe` reads: `Drafter.observed_logits`) and are never valid;
    # the target's LM head skips them.
    verified: int | None = None

    def __post_init__(self):
        if min(self.nodes, self.depth, self.target_scratch) < 0 or self.depth > self.nodes:
            raise InvalidArgumentError(f"invalid draft shape {self}: counts must be >= 0 and depth <= nodes")
        if self.verified is not None and not self.depth <= self.verified <= self.nodes:
            raise InvalidArgumentError(f"invalid draft shape {self}: verified nodes must be between depth and nodes")

    @property
    def num_verified(self) -> int:
        """Nodes verification may accept (a prefix of the tree)."""
        return self.nodes if self.verified is None else self.verified


class PrefillContext(NamedTuple):
    """What `prefill` sees: the target has just read the prompts."""

    target_params: Any
    cfg: Config
    cache: KVCache  # target cache after the prompt (lengths = prompt lengths)
    tokens_BxS: jax.Array  # prompt then the first generated (pending) token
    prompts_BxT: jax.Array  # the right-padded prompts as fed to the target
    prompt_lens_B: jax.Array
    hidden: dict  # target residual stream after i layers over the prompt, for i in `hidden_layers`
    final_hidden_BxTxE: jax.Array  # target residual stream after the last layer (before the final norm)
    logits_BxV: jax.Array  # target logits at the last prompt token
    sampling: Sampling
    rng: jax.Array  # derived from the run's seed, for drafters that need randomness


class StepContext(NamedTuple):
    """What `propose` sees at the start of a step."""

    target_params: Any
    cfg: Config
    cache: KVCache  # committed target cache (`cache.lengths` = committed_B)
    tokens_BxS: jax.Array  # committed tokens; tokens_BxS[b, committed_B[b]] is the pending token
    committed_B: jax.Array  # committed lengths before this step
    pending_B: jax.Array  # the token whose successors are drafted (the tree's root)
    sampling: Sampling
    rng: jax.Array


class StepResult(NamedTuple):
    """What `observe` sees after verification and the KV commit."""

    tree: DraftTree
    inputs_BxT: jax.Array  # [B, 1+N] root + node tokens fed to the target
    # Target logits at the root and the verified nodes, then at the drafter's `observed_logits` slots (at every
    # slot when `shape.verified` is None).
    logits_BxTxV: jax.Array
    hidden: dict  # target hidden states at every slot, for `hidden_layers`
    final_hidden_BxTxE: jax.Array  # target residual stream after the last layer, at every slot
    path_BxP: jax.Array  # [B, D+1] accepted slots by depth (slot 0 is the root)
    num_accepted_B: jax.Array
    next_token_B: jax.Array  # the bonus or corrected token (the next step's pending token)
    tokens_BxS: jax.Array  # the token buffer after this step
    committed_before_B: jax.Array  # committed lengths before this step (StepContext.committed_B)
    committed_after_B: jax.Array  # committed lengths after it
    active_B: jax.Array  # sequences that were still generating in this step


@dataclasses.dataclass(frozen=True)
class Drafter:
    """Base drafter: proposes nothing, which makes the engine plain autoregressive decoding."""

    name: ClassVar[str] = "ar"
    host: ClassVar[bool] = False  # True for drafters whose propose calls the host (timed separately)
    # True for drafters whose tree can be shrunk to any node count by `pruned` (`--budget N|auto`).
    prunable: ClassVar[bool] = False

    @property
    def shape(self) -> DraftShape:
        """Static bounds of `propose` (nodes, depth, target scratch slots)."""
        return DraftShape(nodes=0, depth=0)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Residual-stream depths of the target that `prefill` / `observe` need."""
        return ()

    @property
    def observed_logits(self) -> tuple[int, ...]:
        """Slots of [root, nodes] past the verified prefix (`shape.verified`) whose target logits `observe` reads."""
        return ()

    def check(self, cfg: Config, weights, carry) -> None:
        """Refuse a misconfiguration or mismatched weights/carry before any compute (override to validate)."""

    def init(self, weights, carry, cfg: Config, batch: int, cache_size: int):
        """Initial state pytree (from `carry` when the previous request left one)."""
        return ()

    def prefill(self, weights, state, ctx: PrefillContext):
        return state

    def propose(self, weights, state, ctx: StepContext) -> tuple[DraftTree, Any, KVCache]:
        """A tree of drafts, the new state, and the target cache (with any scratch `propose` wrote)."""
        empty = jnp.zeros((ctx.pending_B.shape[0], 0), jnp.int32)
        return TreeTemplate.chain(0).build(empty), state, ctx.cache

    def observe(self, weights, state, result: StepResult):
        return state

    def verify_forward(self, weights, state, params, cfg: Config, inputs_BxT, positions_BxT, cache: KVCache,
                       mask_BxTxT, return_hidden: tuple[int, ...], logits_at=None):
        """The target's forward over [root, nodes] (a `models.Output`), writing all layers' K/V at the T slots,
        with logits at the slots `logits_at[B, K]` (every slot when None).

        `state` is the drafter state after `propose`. A self-speculative drafter that already computed the early
        layers for these tokens overrides this (early_exit runs only the upper layers from its exit states);
        the cache it returns must be the one this default would return.
        """
        return forward(params, cfg, inputs_BxT, positions_BxT, cache, mask_BxTxT, return_hidden=return_hidden,
                       logits_at=logits_at)

    def pruned(self, nodes: int, rates: np.ndarray | None = None) -> Drafter:
        """This drafter with its tree shrunk to `nodes` nodes (prunable drafters). `rates[i]`, when given, is
        how often node slot i was accepted in a calibration run (`--budget auto`); else the drafter's own
        order of preference decides which nodes go."""
        raise InvalidArgumentError(f"method {self.name} has no prunable tree")

    def carry_out(self, state):
        """What the next request starts from (drafters that learn while decoding); None otherwise."""
        return None

    def host_seconds(self) -> float:
        """Seconds this drafter has spent in host code so far (host drafters; 0 for on-device ones)."""
        return 0.0


@dataclasses.dataclass(frozen=True)
class TemplateDrafter(Drafter):
    """A drafter whose trees all have one static shape, `template`; its `shape` follows from it.

    `prunable` drafters fill any sub-tree of their template equally well, so `--budget N|auto` can
    shrink the template (`pruned`, through `with_template`) to what this device verifies fastest.
    """

    @property
    def template(self) -> TreeTemplate:
        raise NotImplementedError

    @property
    def shape(self) -> DraftShape:
        return DraftShape(nodes=self.template.num_nodes, depth=self.template.max_depth)

    def with_template(self, template: TreeTemplate) -> TemplateDrafter:
        """This drafter with its tree replaced by `template` (a pruned sub-tree of its own); prunable only."""
        raise InvalidArgumentError(f"method {self.name} has no prunable tree")

    def pruned(self, nodes: int, rates: np.ndarray | None = None) -> TemplateDrafter:
        """The sub-tree of `nodes` nodes with the highest calibrated `rates`, or else the template's own rank
        prior (the order Medusa-style choice lists are built in), closed under ancestors."""
        from spec_jax.policies.budget import prune_template
        from spec_jax.trees import rank_prior

        if not self.prunable:
            return super().pruned(nodes, rates)
        tmpl = self.template
        if rates is None:
            rates = np.array([rank_prior(p) for p in tmpl.paths])
        return self.with_template(prune_template(tmpl, rates, nodes))
