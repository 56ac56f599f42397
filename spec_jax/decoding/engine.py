"""The jitted draft-then-verify step and the on-device generation loop.

One step: drafter.propose -> target forward on [root, nodes] with the tree mask -> verify ->
commit the accepted KV entries -> write the new tokens -> drafter.observe. Autoregressive decoding
is the same step with the base `Drafter`, which proposes an empty tree.

The loop is a `lax.while_loop` over a `DecodeState` of static shapes; `run` takes a step limit so
the host can stream text chunk by chunk without a Python round trip per token. The state is donated.

With a mesh (`Engine.mesh`), every jitted function is compiled with explicit in/out shardings: the
parameters keep the shardings they were loaded with, the decode state is born sharded in `prefill`
(batch over `data`, KV heads over `model`; `state_shardings`), and what the host reads (counters,
output tokens) is gathered with `sharding.fetch`, which also works when a process holds only its own
shards (multi-host).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from spec_jax import sampling as sp
from spec_jax.decoding.verify import VERIFY_MODES, verify
from spec_jax.drafters.base import Drafter, DraftShape, PrefillContext, StepContext, StepResult
from spec_jax.errors import CacheOverflowError, DrafterContractError, InvalidArgumentError
from spec_jax.models import Config, KVCache, cache_shardings, commit, forward, init_cache
from spec_jax.sharding import batch_sharding, fetch, replicated, to_global
from spec_jax.trees import DraftTree, with_root


@struct.dataclass
class DecodeState:
    cache: KVCache
    tokens_BxS: jax.Array  # prompt + generated; tokens_BxS[b, cache.lengths[b]] is the pending token
    prompt_lens_B: jax.Array
    max_new_B: jax.Array  # requested new tokens
    num_new_B: jax.Array  # generated so far (the pending token included)
    done_B: jax.Array
    rng: jax.Array
    drafter: Any  # the drafter's state pytree
    steps: jax.Array  # scalar: loop iterations (target forwards after prefill)
    forwards_B: jax.Array  # target forwards while the sequence was generating (prefill included)
    accepted_B: jax.Array  # draft tokens accepted
    reached_D: jax.Array  # nodes at depth d that were verified with their parent accepted
    accepted_at_D: jax.Array  # of those, accepted
    node_hits_N: jax.Array  # times each tree node (template slot) was on the accepted path

    def counters(self) -> dict:
        """The statistics the host reads after a run (fetched alone, never the whole state)."""
        return {"forwards": self.forwards_B, "accepted": self.accepted_B, "reached": self.reached_D,
                "accepted_at": self.accepted_at_D, "node_hits": self.node_hits_N}


class Proposal(NamedTuple):
    """What the drafting half of a step hands the verifying half."""

    tree: DraftTree
    drafter: Any  # drafter state after propose
    cache: KVCache  # target cache (drafters may have written scratch entries)
    pending_B: jax.Array  # the tree's root: the token after the committed ones
    rng: jax.Array  # the state's next key
    verify_key: jax.Array


@dataclasses.dataclass(frozen=True)
class Engine:
    """Static settings of a decoding run (hashable: a jit static argument)."""

    cfg: Config
    drafter: Drafter = Drafter()
    sampling: sp.Sampling = sp.Sampling()
    verify_mode: str = "lossless"  # "typical" is Medusa-2's LOSSY acceptance, opt-in
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.verify_mode not in VERIFY_MODES:
            raise InvalidArgumentError(f"unknown verification mode {self.verify_mode!r}; use "
                                       f"{' or '.join(map(repr, VERIFY_MODES))}")

    @property
    def shape(self) -> DraftShape:
        return self.drafter.shape

    @property
    def scratch(self) -> int:
        """Cache slots past the committed length that one step may write (verification or drafting)."""
        return max(self.shape.nodes + 1, self.shape.target_scratch)

    @property
    def logit_slots(self) -> np.ndarray | None:
        """Slots of [root, nodes] whose target logits are computed (None: all): the root and the nodes
        verification may accept, then the ones the drafter's `observe` reads."""
        shape = self.shape
        if shape.num_verified == shape.nodes:
            return None
        return np.concatenate([np.arange(1 + shape.num_verified), self.drafter.observed_logits]).astype(np.int32)

    @property
    def eos(self) -> jax.Array:
        return jnp.asarray(self.cfg.eos_token_ids or (-1,), jnp.int32)

    # ------------------------------------------------------------------ host-side set-up

    def cache_size(self, max_prompt: int, max_new: int) -> int:
        """Slots needed: prompt + generation + one step's scratch, rounded up so compiles are reused."""
        need = max_prompt + max_new + self.scratch + 1
        return int(-(-need // 128) * 128)

    def check(self, prompt_lens, max_new: int, cache_size: int) -> None:
        if len(prompt_lens) == 0 or min(prompt_lens) == 0:
            raise InvalidArgumentError("empty prompt: give at least one token of text")
        if max_new < 1:
            raise InvalidArgumentError(f"--max-new-tokens must be >= 1, got {max_new}")
        need = max(prompt_lens) + max_new + self.scratch
        if need > cache_size:
            raise CacheOverflowError(
                f"prompt of {max(prompt_lens)} tokens + {max_new} new tokens + a draft step writing "
                f"{self.scratch} slots needs {need} cache slots, but the cache has "
                f"{cache_size}; shorten the prompt, lower --max-new-tokens or the draft budget"
            )
        if need > self.cfg.max_position_embeddings:
            raise CacheOverflowError(
                f"the prompt ({max(prompt_lens)} tokens) + --max-new-tokens {max_new} + a draft step's {self.scratch} "
                f"slots need {need} positions but the model supports {self.cfg.max_position_embeddings}; "
                "shorten the prompt or lower --max-new-tokens"
            )

    def pad_prompts(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad prompts to a multiple of 64 tokens (one compile per bucket)."""
        lens = np.array([len(p) for p in prompts], np.int32)
        width = int(-(-max(lens.max(), 1) // 64) * 64)
        out = np.zeros((len(prompts), width), np.int32)
        for i, p in enumerate(prompts):
            out[i, : len(p)] = p
        return out, lens

    # ------------------------------------------------------------------ traced pieces

    def initial_state(self, weights, carry, batch: int, cache_size: int) -> DecodeState:
        """An empty decode state (prefill fills it); also what `state_shardings` is computed from."""
        D, N = max(self.shape.depth, 1), max(self.shape.nodes, 1)
        zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
        return DecodeState(
            cache=init_cache(self.cfg, batch, cache_size), tokens_BxS=zeros(batch, cache_size),
            prompt_lens_B=zeros(batch), max_new_B=zeros(batch), num_new_B=jnp.ones((batch,), jnp.int32),
            done_B=jnp.zeros((batch,), bool), rng=jax.random.key(0),
            drafter=self.drafter.init(weights, carry, self.cfg, batch, cache_size), steps=jnp.int32(0),
            forwards_B=jnp.ones((batch,), jnp.int32), accepted_B=zeros(batch), reached_D=zeros(D),
            accepted_at_D=zeros(D), node_hits_N=zeros(N))

    def _prefill(self, cache_size: int, params, weights, carry, prompts_BxT, prompt_lens_B, max_new_B, seed):
        """Process the prompts, sample the first token, and build the initial DecodeState."""
        cfg, B = self.cfg, prompts_BxT.shape[0]
        state = self.initial_state(weights, carry, B, cache_size)
        positions_BxT = jnp.broadcast_to(jnp.arange(prompts_BxT.shape[1]), prompts_BxT.shape)
        out = forward(params, cfg, prompts_BxT, positions_BxT, state.cache, logits_at=(prompt_lens_B - 1)[:, None],
                      return_hidden=self.drafter.hidden_layers)
        cache = out.cache.replace(lengths=prompt_lens_B)
        rng, key = jax.random.split(jax.random.key(seed))
        first_B = sp.next_token(key, out.logits[:, 0], self.sampling)
        tokens_BxS = state.tokens_BxS.at[:, : prompts_BxT.shape[1]].set(prompts_BxT)
        tokens_BxS = tokens_BxS.at[jnp.arange(B), prompt_lens_B].set(first_B)
        ctx = PrefillContext(target_params=params, cfg=cfg, cache=cache, tokens_BxS=tokens_BxS,
                             prompts_BxT=prompts_BxT, prompt_lens_B=prompt_lens_B, hidden=out.hidden,
                             final_hidden_BxTxE=out.final_hidden, logits_BxV=out.logits[:, 0],
                             sampling=self.sampling, rng=jax.random.fold_in(key, 1))
        return state.replace(
            cache=cache, tokens_BxS=tokens_BxS, prompt_lens_B=prompt_lens_B, max_new_B=max_new_B,
            done_B=jnp.isin(first_B, self.eos) | (max_new_B <= 1), rng=rng,
            drafter=self.drafter.prefill(weights, state.drafter, ctx))

    def step(self, params, weights, state: DecodeState) -> DecodeState:
        """One draft-then-verify step for every sequence still generating."""
        return self.verify_commit(params, weights, state, self.draft(params, weights, state))

    def draft(self, params, weights, state: DecodeState) -> Proposal:
        """The drafting half of a step: the drafter proposes a tree for each sequence."""
        rng, k_draft, k_verify = jax.random.split(state.rng, 3)
        committed_B = state.cache.lengths
        pending_B = jnp.take_along_axis(state.tokens_BxS, committed_B[:, None], axis=1)[:, 0]
        ctx = StepContext(target_params=params, cfg=self.cfg, cache=state.cache, tokens_BxS=state.tokens_BxS,
                          committed_B=committed_B, pending_B=pending_B, sampling=self.sampling, rng=k_draft)
        tree, dstate, cache = self.drafter.propose(weights, state.drafter, ctx)
        return Proposal(tree=tree, drafter=dstate, cache=cache, pending_B=pending_B, rng=rng, verify_key=k_verify)

    def verify_commit(self, params, weights, state: DecodeState, proposal: Proposal) -> DecodeState:
        """The verifying half: target forward on the tree, verification, KV commit, drafter update."""
        cfg, drafter = self.cfg, self.drafter
        B = state.tokens_BxS.shape[0]
        tree, cache = proposal.tree, proposal.cache
        committed_B = cache.lengths
        inputs_BxT, positions_BxT, mask_BxTxT = with_root(tree, proposal.pending_B, committed_B)
        slots = self.logit_slots  # the LM head only where verification and the drafter read it
        out = drafter.verify_forward(weights, proposal.drafter, params, cfg, inputs_BxT, positions_BxT, cache,
                                     mask_BxTxT if tree.num_nodes else None, drafter.hidden_layers,
                                     logits_at=None if slots is None else jnp.broadcast_to(slots, (B, len(slots))))
        verified = self.shape.num_verified
        res = verify(tree.first(verified), out.logits[:, : 1 + verified], self.sampling, proposal.verify_key,
                     self.shape.depth, self.verify_mode)
        active_B = ~state.done_B
        n_commit_B = res.num_accepted_B + 1  # the root (pending token) plus the accepted drafts
        cache = commit(out.cache, res.path_BxP, jnp.where(active_B, n_commit_B, 0))

        # Tokens: the accepted path (root first) at the committed length, then the next token after it.
        path_tokens_BxP = jnp.take_along_axis(inputs_BxT, res.path_BxP, axis=1)
        tokens_BxS = jax.vmap(lambda t, new, s: jax.lax.dynamic_update_slice(t, new, (s,)))(
            state.tokens_BxS, path_tokens_BxP, committed_B)
        tokens_BxS = tokens_BxS.at[jnp.arange(B), committed_B + n_commit_B].set(res.next_token_B)
        tokens_BxS = jnp.where(active_B[:, None], tokens_BxS, state.tokens_BxS)

        # Emitted this step: positions committed+1 .. committed+n_commit; stop at EOS or max_new.
        offs_P = jnp.arange(res.path_BxP.shape[1])
        emitted_BxP = jnp.take_along_axis(tokens_BxS, committed_B[:, None] + 1 + offs_P[None], axis=1)
        in_step_BxP = offs_P[None] < n_commit_B[:, None]
        is_eos_BxP = jnp.isin(emitted_BxP, self.eos) & in_step_BxP
        upto_eos_B = jnp.where(jnp.any(is_eos_BxP, 1), jnp.argmax(is_eos_BxP, 1) + 1, n_commit_B)
        n_emit_B = jnp.minimum(upto_eos_B, state.max_new_B - state.num_new_B)
        num_new_B = state.num_new_B + jnp.where(active_B, n_emit_B, 0)
        done_B = state.done_B | (active_B & (jnp.any(is_eos_BxP, 1) | (num_new_B >= state.max_new_B)))

        result = StepResult(
            tree=tree, inputs_BxT=inputs_BxT, logits_BxTxV=out.logits, hidden=out.hidden,
            final_hidden_BxTxE=out.final_hidden, path_BxP=res.path_BxP, num_accepted_B=res.num_accepted_B,
            next_token_B=res.next_token_B, tokens_BxS=tokens_BxS, committed_before_B=committed_B,
            committed_after_B=cache.lengths, active_B=active_B)
        dstate = drafter.observe(weights, proposal.drafter, result)
        return state.replace(
            cache=cache, tokens_BxS=tokens_BxS, num_new_B=num_new_B, done_B=done_B, rng=proposal.rng, drafter=dstate,
            steps=state.steps + 1, forwards_B=state.forwards_B + active_B,
            accepted_B=state.accepted_B + jnp.where(active_B, res.num_accepted_B, 0),
            **_depth_stats(state, tree, res.path_BxP, res.num_accepted_B, active_B))

    def loop(self, params, weights, state: DecodeState, step_limit) -> DecodeState:
        """Step until every sequence is done or `state.steps` reaches `step_limit` (traceable)."""
        cond = lambda s: jnp.any(~s.done_B) & (s.steps < step_limit)
        return jax.lax.while_loop(cond, lambda s: self.step(params, weights, s), state)

    # The two halves apart, for runs that time drafting and verification separately (a host round trip
    # per step; the fused `loop` is what throughput figures use). The caches and the drafter state are
    # passed apart from the rest of the state so that they can be donated.

    def _draft_phase(self, params, weights, rest: DecodeState, cache: KVCache, dstate) -> Proposal:
        return self.draft(params, weights, rest.replace(cache=cache, drafter=dstate))

    def _verify_phase(self, params, weights, rest: DecodeState, proposal: Proposal, cache: KVCache,
                      dstate) -> DecodeState:
        proposal = proposal._replace(cache=cache, drafter=dstate)
        return self.verify_commit(params, weights, rest.replace(cache=cache), proposal)

    # ------------------------------------------------------------------ jitted entry points

    def state_shardings(self, state: DecodeState):
        """NamedShardings of a (possibly abstract) decode state on the mesh: caches by their logical axes,
        per-sequence arrays over `data`, everything else replicated."""
        return _state_shardings(state, self.mesh)

    def prefill(self, params, weights, carry, prompts_BxT: np.ndarray, prompt_lens_B: np.ndarray, max_new: int,
                seed: int, cache_size: int) -> DecodeState:
        """The initial decode state (on the mesh when there is one) after reading the prompts."""
        B = prompts_BxT.shape[0]
        max_new_B = np.full((B,), max_new, np.int32)
        inputs = [prompts_BxT, prompt_lens_B, max_new_B]
        out_sh = None
        if self.mesh is not None:
            inputs = [to_global(x, batch_sharding(x, self.mesh)) for x in inputs]
            carry = None if carry is None else jax.tree.map(lambda x: _place_replicated(x, self.mesh), carry)
            abstract = jax.eval_shape(lambda w, c: self.initial_state(w, c, B, cache_size), weights, carry)
            out_sh = self.state_shardings(abstract)
        fn = _jitted(self, "prefill", (cache_size,), (), _shardings_key((params, weights, carry, *inputs, None),
                                                                         out_sh, self.mesh))
        return fn(params, weights, carry, *inputs, np.int32(seed))

    def run(self, params, weights, state: DecodeState, step_limit: int) -> DecodeState:
        """Run the on-device loop up to `step_limit` total steps; the state is donated."""
        limit = np.int32(min(step_limit, np.iinfo(np.int32).max))
        key = _shardings_key((params, weights, state, None), _out_like(state), self.mesh)
        return _jitted(self, "loop", (), (2,), key)(params, weights, state, limit)

    def draft_phase(self, params, weights, state: DecodeState) -> Proposal:
        """The drafting half of one step as its own device call (the state's cache and drafter are donated)."""
        rest = state.replace(cache=None, drafter=None)
        out = None if self.mesh is None else Proposal(
            tree=None, drafter=_out_like(state.drafter), cache=_out_like(state.cache), pending_B=None, rng=None,
            verify_key=None)
        key = _shardings_key((params, weights, rest, state.cache, state.drafter), out, self.mesh)
        return _jitted(self, "draft_phase", (), (3, 4), key)(params, weights, rest, state.cache, state.drafter)

    def verify_phase(self, params, weights, state: DecodeState, proposal: Proposal) -> DecodeState:
        """The verifying half of one step as its own device call (the proposal's cache and drafter are donated)."""
        rest = state.replace(cache=None, drafter=None)
        bare = proposal._replace(cache=None, drafter=None)
        key = _shardings_key((params, weights, rest, bare, proposal.cache, proposal.drafter),
                             _out_like(state), self.mesh)
        return _jitted(self, "verify_phase", (), (4, 5), key)(params, weights, rest, bare, proposal.cache,
                                                                  proposal.drafter)

    # ------------------------------------------------------------------ outputs

    def outputs(self, state: DecodeState) -> list[list[int]]:
        """Generated token ids per sequence (host; works when each process holds only its own shards)."""
        tokens, starts, counts = fetch((state.tokens_BxS, state.prompt_lens_B, state.num_new_B), self.mesh)
        return [tokens[b, starts[b]: starts[b] + counts[b]].tolist() for b in range(tokens.shape[0])]

    def all_done(self, state: DecodeState) -> bool:
        """Whether every sequence has finished (read on the host)."""
        return bool(np.all(fetch(state.done_B, self.mesh)))


def _depth_stats(state: DecodeState, tree: DraftTree, path_BxP, num_accepted_B, active_B) -> dict:
    """Per-depth acceptance counters and per-node hits after one step."""
    D = state.reached_D.shape[0]
    depths = jnp.arange(1, D + 1)
    depth_has_node_BxD = jnp.any(tree.valid[:, :, None] & (tree.depth[:, :, None] == depths), axis=1)
    reached_BxD = depth_has_node_BxD & (num_accepted_B[:, None] >= depths - 1) & active_B[:, None]
    acc_at_BxD = (num_accepted_B[:, None] >= depths) & active_B[:, None]
    on_path_BxD = (jnp.arange(path_BxP.shape[1] - 1)[None] < num_accepted_B[:, None]) & active_B[:, None]
    N = state.node_hits_N.shape[0]
    hits_N = state.node_hits_N.at[jnp.where(on_path_BxD, path_BxP[:, 1:] - 1, N)].add(1, mode="drop")
    return {"reached_D": state.reached_D + jnp.sum(reached_BxD, 0),
            "accepted_at_D": state.accepted_at_D + jnp.sum(acc_at_BxD, 0), "node_hits_N": hits_N}


def _state_shardings(tree, mesh):
    """See `Engine.state_shardings`."""
    if mesh is None:
        return None
    B = tree.tokens_BxS.shape[0] if isinstance(tree, DecodeState) else None

    def leaf(x):
        if isinstance(x, KVCache):
            return cache_shardings(x, mesh)
        shape = np.shape(x)
        return batch_sharding(x, mesh) if shape and shape[0] == B else replicated(mesh)

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, KVCache))


def _place_replicated(x, mesh):
    """A carry leaf on the mesh: kept where it already is (the previous request's), else replicated from host."""
    on_mesh = isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh
    return x if on_mesh else to_global(np.asarray(x), replicated(mesh))


def _out_like(tree):
    """Out shardings equal to the shardings a (placed) pytree has now."""
    return jax.tree.map(lambda x: x.sharding, tree)


def _shardings_key(args, out, mesh):
    """A hashable description of in/out shardings for `_jitted` (None without a mesh)."""
    if mesh is None:
        return None
    in_sh = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None, args)
    in_leaves, in_def = jax.tree.flatten(in_sh, is_leaf=lambda x: x is None)
    out_leaves, out_def = jax.tree.flatten(out, is_leaf=lambda x: x is None)
    return in_def, tuple(in_leaves), out_def, tuple(out_leaves)


_FUNCTIONS = {"prefill": Engine._prefill, "loop": Engine.loop, "draft_phase": Engine._draft_phase,
              "verify_phase": Engine._verify_phase}


@functools.lru_cache(maxsize=64)
def _jitted(engine: Engine, kind: str, static: tuple, donate: tuple, shardings):
    """`jax.jit` of one engine function with its static arguments bound, once per engine and shardings."""
    fn = functools.partial(_FUNCTIONS[kind], engine, *static)
    if shardings is None:
        return jax.jit(fn, donate_argnums=donate)
    in_def, in_leaves, out_def, out_leaves = shardings
    return jax.jit(fn, in_shardings=jax.tree.unflatten(in_def, in_leaves),
                   out_shardings=jax.tree.unflatten(out_def, out_leaves), donate_argnums=donate)


# ----------------------------------------------------------------------------- the drafter audit

_AUDITED: set = set()
_SENTINEL = 1e30  # never a K/V value of a real forward


def audit_drafter(engine: Engine, params, weights, carry) -> None:
    """Refuse, before the engine compiles, a drafter that mismatches its weights or breaks its `DraftShape`.

    `Drafter.check` validates settings, weights and carry. Then, once per engine, `propose` runs on a
    one-sequence probe (a small program of its own, compiled apart from the engine's step) whose target
    cache holds a sentinel in every scratch slot: the trees must have the declared node count and
    accepted depth, the committed slots and lengths must be untouched, and no scratch slot past the
    declared `target_scratch` may have been written. A drafter that wrote more would, near the end of
    the cache, have its writes clamped back over committed entries.
    """
    engine.drafter.check(engine.cfg, weights, carry)
    if engine.drafter.host and jax.process_count() > 1:
        raise InvalidArgumentError(f"method {engine.drafter.name} calls the host while drafting (a host callback, "
                                   "e.g. for a --sam-corpus), which a multi-host run cannot share; use it on one host")
    _check_placement(engine, params)
    key = (engine, jax.tree.structure(weights), tuple(np.shape(x) for x in jax.tree.leaves(weights)))
    if key in _AUDITED:
        return
    _check_probe(engine, *fetch(_probe(engine)(params, weights, carry), engine.mesh))
    _AUDITED.add(key)


_PROBE_COMMITTED = 4  # committed slots of the probe


@functools.lru_cache(maxsize=16)
def _probe(engine: Engine):
    """jit(params, weights, carry) -> (depth [N], valid [N], written [S] per scratch slot, committed part changed)."""
    cfg, drafter, shape = engine.cfg, engine.drafter, engine.shape
    c = _PROBE_COMMITTED
    size = c + engine.scratch + 2 * (shape.nodes + shape.target_scratch) + 8

    def probe(params, weights, carry):
        # Committed slots hold 0, scratch slots a finite sentinel (NaN would leak through attention as 0 x NaN).
        buf = jnp.where(jnp.arange(size)[None, :, None, None] < c, 0.0, _SENTINEL)
        buf = jnp.broadcast_to(buf, (1, size, cfg.num_kv_heads, cfg.head_dim)).astype(cfg.jnp_dtype)
        tokens_1xS = (jnp.arange(size, dtype=jnp.int32) % max(cfg.vocab_size - 1, 1) + 1)[None]
        cache = KVCache(k=(buf,) * cfg.num_layers, v=(buf,) * cfg.num_layers, lengths=jnp.full((1,), c, jnp.int32))
        ctx = StepContext(target_params=params, cfg=cfg, cache=cache, tokens_BxS=tokens_1xS,
                          committed_B=cache.lengths, pending_B=tokens_1xS[:, c], sampling=engine.sampling,
                          rng=jax.random.key(0))
        tree, _, out = drafter.propose(weights, drafter.init(weights, carry, cfg, 1, size), ctx)
        first_LxS = jnp.stack([x[0, :, 0, 0].astype(jnp.float32) for x in out.k + out.v])
        written_S = jnp.any(first_LxS != jnp.float32(_SENTINEL), axis=0)
        changed = jnp.any(first_LxS[:, :c] != 0) | jnp.any(out.lengths != c)
        return tree.depth[0], tree.valid[0], written_S[c:], changed

    return jax.jit(probe)


def _check_placement(engine: Engine, params) -> None:
    """Params must live on the engine's mesh (else XLA would fail later with 'incompatible devices')."""
    leaf = jax.tree.leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    if engine.mesh is not None and getattr(sharding, "mesh", None) != engine.mesh:
        raise InvalidArgumentError("the parameters are not on the engine's mesh; load them with "
                                   "load_model(..., mesh=mesh) or init_params(..., mesh=mesh) for the same mesh")


def _check_probe(engine: Engine, depth_N, valid_N, written_S, committed_changed) -> None:
    name, shape = engine.drafter.name, engine.shape
    if depth_N.shape[0] != shape.nodes:
        raise DrafterContractError(f"drafter {name!r} proposed trees of {depth_N.shape[0]} nodes but its shape "
                                   f"declares {shape.nodes}; make `shape.nodes` the tree size `propose` returns")
    deepest = int(depth_N[valid_N].max(initial=0))
    if deepest > shape.depth:
        raise DrafterContractError(f"drafter {name!r} proposed a valid node at depth {deepest} but its shape "
                                   f"declares depth {shape.depth}")
    if valid_N[shape.num_verified:].any():
        raise DrafterContractError(f"drafter {name!r} proposed a valid node past the {shape.num_verified} its shape "
                                   "declares verified; only those get target logits, so the others must be invalid")
    observed = np.asarray(engine.drafter.observed_logits, int)
    if shape.verified is None and observed.size or np.any((observed <= shape.num_verified) | (observed > shape.nodes)):
        raise DrafterContractError(f"drafter {name!r} reads logits at slots {observed.tolist()}; `observed_logits` "
                                   f"names slots past the verified nodes, from {shape.num_verified + 1} to "
                                   f"{shape.nodes}, when `shape.verified` is set")
    if committed_changed:
        raise DrafterContractError(f"drafter {name!r} changed committed target-cache entries or the cache lengths; "
                                   "drafters may write only scratch slots and must return the lengths unchanged")
    written = np.flatnonzero(written_S)
    extent = int(written.max()) + 1 if written.size else 0
    if extent > shape.target_scratch:
        raise DrafterContractError(
            f"drafter {name!r} writes {extent} target-cache scratch slots past the committed length but its shape "
            f"declares target_scratch={shape.target_scratch}; declare at least {extent} in `shape` so the "
            "engine reserves them (an undeclared write near the end of the cache lands on committed entries)")
