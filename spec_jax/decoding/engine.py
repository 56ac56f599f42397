"""The jitted draft-then-verify step and the on-device generation loop.

One step: drafter.propose -> target forward on [root, nodes] with the tree mask -> verify ->
commit the accepted KV entries -> write the new tokens -> drafter.observe. Autoregressive decoding
is the same step with the base `Drafter`, which proposes an empty tree.

The loop is a `lax.while_loop` over a `DecodeState` of static shapes; `run` takes a step limit so
the host can stream text chunk by chunk without a Python round trip per token. The state is donated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spec_jax import sampling as sp
from spec_jax.decoding.verify import verify
from spec_jax.drafters.base import Drafter, PrefillContext, StepContext, StepResult
from spec_jax.errors import CacheOverflowError, InvalidArgumentError
from spec_jax.models import Config, KVCache, commit, forward, init_cache
from spec_jax.trees import DraftTree, with_root


@struct.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array  # [B, S] prompt + generated; tokens[b, cache.lengths[b]] is pending
    prompt_lens: jax.Array  # [B]
    max_new: jax.Array  # [B] requested new tokens
    num_new: jax.Array  # [B] generated so far (the pending token included)
    done: jax.Array  # [B]
    rng: jax.Array
    drafter: Any
    steps: jax.Array  # scalar: loop iterations (target forwards after prefill)
    forwards: jax.Array  # [B] target forwards while the sequence was generating (prefill included)
    accepted: jax.Array  # [B] draft tokens accepted
    reached: jax.Array  # [D] nodes at depth d that were verified with their parent accepted
    accepted_at: jax.Array  # [D] of those, accepted
    node_hits: jax.Array  # [N] times each tree node (template slot) was on the accepted path


class Proposal(NamedTuple):
    """What the drafting half of a step hands the verifying half."""

    tree: DraftTree
    drafter: Any  # drafter state after propose
    cache: KVCache  # target cache (drafters may have written scratch entries)
    pending: jax.Array  # [B] the tree's root: the token after the committed ones
    rng: jax.Array  # the state's next key
    verify_key: jax.Array


@dataclasses.dataclass(frozen=True)
class Engine:
    """Static settings of a decoding run (hashable: a jit static argument)."""

    cfg: Config
    drafter: Drafter = Drafter()
    sampling: sp.Sampling = sp.Sampling()
    verify_mode: str = "lossless"  # "typical" is Medusa-2's LOSSY acceptance, opt-in

    @property
    def eos(self) -> jax.Array:
        return jnp.asarray(self.cfg.eos_token_ids or (-1,), jnp.int32)

    # ------------------------------------------------------------------ host-side set-up

    def cache_size(self, max_prompt: int, max_new: int) -> int:
        """Slots needed: prompt + generation + one tree, rounded up so compiles are reused."""
        need = max_prompt + max_new + self.drafter.num_nodes + 2
        return int(-(-need // 128) * 128)

    def check(self, prompt_lens, max_new: int, cache_size: int) -> None:
        if len(prompt_lens) == 0 or min(prompt_lens) == 0:
            raise InvalidArgumentError("empty prompt: give at least one token of text")
        if max_new < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new}")
        need = max(prompt_lens) + max_new + self.drafter.num_nodes + 1
        if need > cache_size:
            raise CacheOverflowError(
                f"prompt of {max(prompt_lens)} tokens + {max_new} new tokens + a draft tree of "
                f"{self.drafter.num_nodes} nodes needs {need} cache slots, but the cache has "
                f"{cache_size}; shorten the prompt, lower max_new_tokens or the draft budget"
            )
        if need > self.cfg.max_position_embeddings:
            raise CacheOverflowError(
                f"prompt + generation needs {need} positions but the model supports "
                f"{self.cfg.max_position_embeddings}; shorten the prompt or lower max_new_tokens"
            )

    def pad_prompts(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad prompts to a multiple of 64 tokens (one compile per bucket)."""
        lens = np.array([len(p) for p in prompts], np.int32)
        width = int(-(-max(lens.max(), 1) // 64) * 64)
        out = np.zeros((len(prompts), width), np.int32)
        for i, p in enumerate(prompts):
            out[i, : len(p)] = p
        return out, lens

    # ------------------------------------------------------------------ jitted pieces

    @functools.partial(jax.jit, static_argnums=(0, 7))
    def prefill(self, params, dparams, prompts_BxT, prompt_lens_B, max_new_B, rng, cache_size: int):
        """Process the prompts, sample the first token, and build the initial DecodeState."""
        cfg, B = self.cfg, prompts_BxT.shape[0]
        cache = init_cache(cfg, B, cache_size)
        positions = jnp.broadcast_to(jnp.arange(prompts_BxT.shape[1]), prompts_BxT.shape)
        out = forward(params, cfg, prompts_BxT, positions, cache, logits_at=(prompt_lens_B - 1)[:, None],
                      return_hidden=self.drafter.hidden_layers)
        cache = out.cache.replace(lengths=prompt_lens_B)
        rng, key = jax.random.split(rng)
        first = sp.next_token(key, out.logits[:, 0], self.sampling)
        tokens = jnp.zeros((B, cache_size), jnp.int32).at[:, : prompts_BxT.shape[1]].set(prompts_BxT)
        tokens = tokens.at[jnp.arange(B), prompt_lens_B].set(first)
        dstate = self.drafter.init(dparams, cfg, B, cache_size)
        dstate = self.drafter.prefill(dparams, dstate, PrefillContext(
            params, cfg, cache, tokens, prompts_BxT, prompt_lens_B, out.hidden, out.logits, self.sampling))
        D = max(self.drafter.max_depth, 1)
        return DecodeState(
            cache=cache, tokens=tokens, prompt_lens=prompt_lens_B, max_new=max_new_B,
            num_new=jnp.ones((B,), jnp.int32), done=jnp.isin(first, self.eos) | (max_new_B <= 1),
            rng=rng, drafter=dstate, steps=jnp.int32(0), forwards=jnp.ones((B,), jnp.int32),
            accepted=jnp.zeros((B,), jnp.int32), reached=jnp.zeros((D,), jnp.int32),
            accepted_at=jnp.zeros((D,), jnp.int32), node_hits=jnp.zeros((max(self.drafter.num_nodes, 1),), jnp.int32))

    def step(self, params, dparams, state: DecodeState) -> DecodeState:
        """One draft-then-verify step for every sequence still generating."""
        return self.verify_commit(params, dparams, state, self.draft(params, dparams, state))

    def draft(self, params, dparams, state: DecodeState) -> Proposal:
        """The drafting half of a step: the drafter proposes a tree for each sequence."""
        rng, k_draft, k_verify = jax.random.split(state.rng, 3)
        lengths = state.cache.lengths
        pending = jnp.take_along_axis(state.tokens, lengths[:, None], axis=1)[:, 0]
        ctx = StepContext(params, self.cfg, state.cache, state.tokens, lengths, pending, self.sampling, k_draft)
        tree, dstate, cache = self.drafter.propose(dparams, state.drafter, ctx)
        return Proposal(tree, dstate, cache, pending, rng, k_verify)

    def verify_commit(self, params, dparams, state: DecodeState, proposal: Proposal) -> DecodeState:
        """The verifying half: target forward on the tree, verification, KV commit, drafter update."""
        cfg, drafter = self.cfg, self.drafter
        B = state.tokens.shape[0]
        tree, dstate, cache, pending, rng, k_verify = proposal
        lengths = cache.lengths
        inputs, positions, mask = with_root(tree, pending, lengths)
        out = forward(params, cfg, inputs, positions, cache, mask if tree.num_nodes else None,
                      return_hidden=drafter.hidden_layers)
        res = verify(tree, out.logits, self.sampling, k_verify, drafter.max_depth, self.verify_mode)
        active = ~state.done
        n_commit = res.num_accepted + 1  # the root (pending token) plus the accepted drafts
        cache = commit(out.cache, res.path, jnp.where(active, n_commit, 0))

        # Tokens: the accepted path (root first) at lengths.., then the next token after it.
        path_tokens = jnp.take_along_axis(inputs, res.path, axis=1)
        tokens = jax.vmap(lambda t, new, s: jax.lax.dynamic_update_slice(t, new, (s,)))(
            state.tokens, path_tokens, lengths)
        tokens = tokens.at[jnp.arange(B), lengths + n_commit].set(res.next_token)
        tokens = jnp.where(active[:, None], tokens, state.tokens)

        # Emitted this step: positions lengths+1 .. lengths+n_commit; stop at EOS or max_new.
        offs = jnp.arange(res.path.shape[1])
        emitted = jnp.take_along_axis(tokens, lengths[:, None] + 1 + offs[None], axis=1)
        in_step = offs[None] < n_commit[:, None]
        is_eos = jnp.isin(emitted, self.eos) & in_step
        upto_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1) + 1, n_commit)
        n_emit = jnp.minimum(upto_eos, state.max_new - state.num_new)
        num_new = state.num_new + jnp.where(active, n_emit, 0)
        done = state.done | (active & (jnp.any(is_eos, 1) | (num_new >= state.max_new)))

        result = StepResult(tree, inputs, out.logits, out.hidden, res.path, res.num_accepted,
                            res.next_token, tokens, cache.lengths, active)
        dstate = drafter.observe(dparams, dstate, result)
        D = state.reached.shape[0]
        depth_has_node = jnp.stack([jnp.any(tree.valid & (tree.depth == d), 1) for d in range(1, D + 1)], 1)
        reached = depth_has_node & (res.num_accepted[:, None] >= jnp.arange(D)[None]) & active[:, None]
        acc_at = (res.num_accepted[:, None] > jnp.arange(D)[None]) & active[:, None]
        on_path = (jnp.arange(res.path.shape[1] - 1)[None] < res.num_accepted[:, None]) & active[:, None]
        hits = state.node_hits.at[jnp.where(on_path, res.path[:, 1:] - 1, state.node_hits.shape[0])].add(
            1, mode="drop")
        return DecodeState(
            cache=cache, tokens=tokens, prompt_lens=state.prompt_lens, max_new=state.max_new,
            num_new=num_new, done=done, rng=rng, drafter=dstate, steps=state.steps + 1,
            forwards=state.forwards + active, accepted=state.accepted + jnp.where(active, res.num_accepted, 0),
            reached=state.reached + jnp.sum(reached, 0), accepted_at=state.accepted_at + jnp.sum(acc_at, 0),
            node_hits=hits)

    def loop(self, params, dparams, state: DecodeState, step_limit) -> DecodeState:
        """Step until every sequence is done or `state.steps` reaches `step_limit` (traceable)."""
        cond = lambda s: jnp.any(~s.done) & (s.steps < step_limit)
        return jax.lax.while_loop(cond, lambda s: self.step(params, dparams, s), state)

    run = functools.partial(jax.jit, static_argnums=0, donate_argnums=3)(loop)

    def sharded_run(self, params, dparams, state: DecodeState):
        """`run` jitted with explicit in/out shardings: those the arguments are placed with."""
        leaves = jax.tree.map(lambda x: x.sharding, (params, dparams, state))
        flat, treedef = jax.tree.flatten(leaves)
        return _sharded_loop(self, treedef, tuple(flat))

    # The two halves jitted apart, for runs that time drafting and verification separately (a host
    # round trip per step; the fused `run` is what throughput figures use). The caches and the
    # drafter state are passed apart from the rest of the state so that they can be donated.

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(4, 5))
    def draft_phase(self, params, dparams, rest: DecodeState, cache: KVCache, dstate) -> Proposal:
        return self.draft(params, dparams, rest.replace(cache=cache, drafter=dstate))

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(3, 5, 6))
    def verify_phase(self, params, dparams, rest: DecodeState, proposal: Proposal, cache: KVCache,
                     dstate) -> DecodeState:
        proposal = proposal._replace(cache=cache, drafter=dstate)
        return self.verify_commit(params, dparams, rest.replace(cache=cache), proposal)

    # ------------------------------------------------------------------ outputs

    @staticmethod
    def outputs(state: DecodeState) -> list[list[int]]:
        """Generated token ids per sequence (host)."""
        tokens, starts, counts = jax.device_get((state.tokens, state.prompt_lens, state.num_new))
        return [tokens[b, starts[b]: starts[b] + counts[b]].tolist()
                for b in range(tokens.shape[0])]


@functools.lru_cache(maxsize=16)
def _sharded_loop(engine: Engine, treedef, flat_shardings):
    params_sh, dparams_sh, state_sh = jax.tree.unflatten(treedef, flat_shardings)
    return jax.jit(functools.partial(Engine.loop, engine), in_shardings=(params_sh, dparams_sh, state_sh, None),
                   out_shardings=state_sh, donate_argnums=2)
