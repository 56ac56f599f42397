"""The one interface every drafter implements, and the contexts the engine hands it.

A drafter is a frozen (hashable) dataclass holding only static settings; everything that changes
lives in its state pytree, and a draft model's weights are passed separately as `params`. All
methods run inside the engine's jitted step, so they must be traceable.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.errors import DataFormatError
from spec_jax.models import Config, KVCache
from spec_jax.sampling import Sampling
from spec_jax.trees import DraftTree, TreeTemplate


def load_int_array(path, ndim: int, what: str, hint: str = "") -> np.ndarray:
    """A drafter's integer array from a .npy file (matrix, token ids), refused clearly when it is not one."""
    path = Path(path)
    try:
        a = np.load(path)
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: not a {what} ({e}){hint}") from e
    if a.ndim != ndim or a.dtype.kind not in "iu":
        raise DataFormatError(f"{path}: expected a {ndim}-D integer {what}, got {a.dtype} {a.shape}")
    return a


class PrefillContext(NamedTuple):
    target_params: Any
    cfg: Config
    cache: KVCache  # target cache after the prompt (lengths = prompt lengths)
    tokens: jax.Array  # [B, S] prompt then the first generated (pending) token
    prompts: jax.Array  # [B, T] the right-padded prompts as fed to the target
    prompt_lens: jax.Array  # [B]
    hidden: dict  # target hidden states requested by `hidden_layers`, for the prompt
    logits: jax.Array  # [B, 1, V] target logits at the last prompt token
    sampling: Sampling


class StepContext(NamedTuple):
    target_params: Any
    cfg: Config
    cache: KVCache  # committed target cache
    tokens: jax.Array  # [B, S] committed tokens; tokens[b, lengths[b]] is the pending token
    lengths: jax.Array  # [B] committed lengths
    pending: jax.Array  # [B] the token whose successors are drafted (the tree's root)
    sampling: Sampling
    rng: jax.Array


class StepResult(NamedTuple):
    tree: DraftTree
    inputs: jax.Array  # [B, 1+N] root + node tokens fed to the target
    logits: jax.Array  # [B, 1+N, V] target logits at every slot
    hidden: dict  # target hidden states at every slot, for `hidden_layers`
    path: jax.Array  # [B, D+1] accepted slots by depth
    num_accepted: jax.Array  # [B]
    next_token: jax.Array  # [B]
    tokens: jax.Array  # [B, S] updated token buffer
    lengths: jax.Array  # [B] new committed lengths
    active: jax.Array  # [B] sequences that were still generating in this step


@dataclasses.dataclass(frozen=True)
class Drafter:
    """Base drafter: proposes nothing, which makes the engine plain autoregressive decoding."""

    name = "ar"
    host = False  # True for drafters whose propose runs on the host (timed separately)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Residual-stream depths of the target that `prefill` / `observe` need."""
        return ()

    @property
    def template(self) -> TreeTemplate:
        """The static shape bound of the trees this drafter proposes."""
        return TreeTemplate.chain(0)

    @property
    def num_nodes(self) -> int:
        return self.template.num_nodes

    @property
    def max_depth(self) -> int:
        return self.template.max_depth

    def check(self, cfg: Config, params) -> None:
        """Refuse a misconfiguration before any compute (override to validate)."""

    def init(self, params, cfg: Config, batch: int, cache_size: int):
        """Initial state pytree."""
        return ()

    def prefill(self, params, state, ctx: PrefillContext):
        return state

    def propose(self, params, state, ctx: StepContext) -> tuple[DraftTree, Any, KVCache]:
        """A tree of drafts, the new state, and the target cache (drafters may write scratch)."""
        B = ctx.pending.shape[0]
        empty = jnp.zeros((B, 0), jnp.int32)
        return self.template.build(empty), state, ctx.cache

    def observe(self, params, state, result: StepResult):
        return state

    def host_seconds(self) -> float:
        """Seconds this drafter has spent in host code so far (host drafters; 0 for on-device ones)."""
        return 0.0

    def next_params(self, params, state):
        """Params for the next run, given this run's final state (drafters that learn while decoding,
        like Token Recycling, carry what they learned across requests)."""
        return params
