"""`lookahead`: Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference
Using Lookahead Decoding").

The target drafts for itself by Jacobi iteration. A window of `window` (W) columns and N-1 levels of
guessed tokens is kept; each step feeds, in ONE target forward:

- the lookahead branch: level l, column j sits at depth j + l + 1 below the pending token and sees
  level 0's columns 0..j and its own column's levels 1..l (a path, so the branch is a tree and the
  engine's ancestor mask is exactly the paper's lookahead mask). The target's argmax at the top level
  is the new top level; the oldest level drops out. Column j then spells an n-gram of N tokens
  (level 0 .. level N-2, new token), which enters the n-gram pool under its first token;
- the verification branch: up to `candidates` (G) n-grams from the pool whose first token is the
  pending token, merged into a trie (equal prefixes share nodes, so siblings are distinct) and
  verified like any deterministic draft tree (greedy, or the point-mass rule under sampling).

Lookahead nodes are marked invalid, so verification never accepts them; their only product is the
pool, and of their logits only the top level's are read, so the target's LM head runs only there
(`DraftShape.verified`, `observed_logits`). The pool holds, per first token, the G most recently
found distinct n-grams ([B, V, G, N-1] int32: 2.4 MB for SmolLM2's vocabulary at G = 4, N = 4).
With `seed_from_prompt` the prompt's own n-grams enter the pool at prefill (as prompt lookup would
use them); the paper's pool starts empty.
Everything is array code inside the jitted step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax import sampling as sp
from spec_jax.drafters.base import Drafter, DraftShape, PrefillContext, StepContext, StepResult
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import InvalidArgumentError
from spec_jax.models import Config
from spec_jax.trees import DraftTree, ancestor_mask, ancestor_mask_from_parents


@dataclasses.dataclass(frozen=True)
class Lookahead(Drafter):
    window: int = 4  # W: Jacobi window (columns)
    ngram: int = 4  # N: n-gram size (the window keeps N-1 levels)
    candidates: int = 4  # G: n-grams verified per step (and kept per first token in the pool)
    seed_from_prompt: bool = True  # also pool the prompt's n-grams at prefill
    name = "lookahead"

    def __post_init__(self):
        if self.window < 1 or self.ngram < 2 or self.candidates < 1:
            raise InvalidArgumentError(
                f"lookahead needs window >= 1, ngram >= 2 and candidates >= 1, got window={self.window}, "
                f"ngram={self.ngram}, candidates={self.candidates}")

    # Node layout: the verification trie first (G chains of N-1 slots), then the lookahead branch
    # (level-major, W columns per level).

    @property
    def shape(self) -> DraftShape:
        # Accepted nodes come from the verification trie only (depth <= N-1); the lookahead branch
        # reaches deeper but is never accepted.
        return DraftShape(nodes=(self.candidates + self.window) * (self.ngram - 1), depth=self.ngram - 1,
                          verified=self.candidates * (self.ngram - 1))

    @property
    def observed_logits(self) -> tuple[int, ...]:
        # Of the lookahead branch, only the top level's logits are read (its argmax is the next top level).
        G, L, W = self.candidates, self.ngram - 1, self.window
        return tuple(range(1 + G * L + (L - 1) * W, 1 + G * L + L * W))

    def _lookahead_shape(self):
        """Parents (-1 = root, indices within the branch) and depths of the lookahead branch."""
        W, L = self.window, self.ngram - 1
        parents, depth = [], []
        for level in range(L):
            for j in range(W):
                parents.append((j - 1 if j else -1) if level == 0 else (level - 1) * W + j)
                depth.append(j + level + 1)
        return np.array(parents, np.int32), np.array(depth, np.int32)

    # ------------------------------------------------------------------ state

    def init(self, weights, carry, cfg: Config, batch: int, cache_size: int):
        L = self.ngram - 1
        return {
            "window": jnp.zeros((batch, L, self.window), jnp.int32),  # [B, level, column]
            "pool": jnp.zeros((batch, cfg.vocab_size, self.candidates, L), jnp.int32),
            "count": jnp.zeros((batch, cfg.vocab_size), jnp.int32),  # n-grams ever pooled per first token
            "steps": jnp.int32(0),
        }

    def prefill(self, weights, state, ctx: PrefillContext):
        B, T = ctx.prompts_BxT.shape
        L, W = self.ngram - 1, self.window
        # The paper starts the window from random prompt tokens (drawn from the run's seed).
        idx_BxM = jax.random.randint(ctx.rng, (B, L * W), 0, ctx.prompt_lens_B[:, None])
        window = jnp.take_along_axis(ctx.prompts_BxT, idx_BxM, axis=1).reshape(B, L, W)
        pool, count = state["pool"], state["count"]
        if self.seed_from_prompt and T > L:
            padded_BxT = jnp.concatenate([ctx.prompts_BxT, jnp.zeros((B, L), jnp.int32)], axis=1)

            def body(i, pc):
                gram_BxN = jax.lax.dynamic_slice_in_dim(padded_BxT, i, L + 1, axis=1)
                return insert(*pc, gram_BxN[:, 0], gram_BxN[:, 1:], i + L < ctx.prompt_lens_B)

            pool, count = jax.lax.fori_loop(0, T - L, body, (pool, count))
        return {**state, "window": window, "pool": pool, "count": count}

    # ------------------------------------------------------------------ drafting

    def propose(self, weights, state, ctx: StepContext):
        B = ctx.pending_B.shape[0]
        G, L, W = self.candidates, self.ngram - 1, self.window
        rows = jnp.arange(B)
        cand = state["pool"][rows, ctx.pending_B]  # [B, G, L]
        used = jnp.arange(G)[None] < state["count"][rows, ctx.pending_B][:, None]  # [B, G]
        v_tokens, v_parents, v_valid = candidate_trie(cand, used)
        v_depth = jnp.broadcast_to(jnp.tile(jnp.arange(1, L + 1, dtype=jnp.int32), G), (B, G * L))

        la_parents, la_depth = self._lookahead_shape()
        Nv, Nl = G * L, W * L
        tokens = jnp.concatenate([v_tokens, state["window"].reshape(B, Nl)], axis=1)
        parents = jnp.concatenate([v_parents, jnp.broadcast_to(np.where(la_parents >= 0, la_parents + Nv, -1),
                                                               (B, Nl))], axis=1)
        depth = jnp.concatenate([v_depth, jnp.broadcast_to(la_depth, (B, Nl))], axis=1)
        mask = jnp.zeros((B, Nv + Nl, Nv + Nl), bool)
        mask = mask.at[:, :Nv, :Nv].set(ancestor_mask_from_parents(v_parents))
        mask = mask.at[:, Nv:, Nv:].set(jnp.asarray(ancestor_mask(la_parents)))
        valid = jnp.concatenate([v_valid, jnp.zeros((B, Nl), bool)], axis=1)
        tree = DraftTree(tokens=tokens, parents=parents.astype(jnp.int32), depth=depth.astype(jnp.int32),
                         mask=mask, valid=valid)
        return tree, state, ctx.cache

    # ------------------------------------------------------------------ update

    def observe(self, weights, state, result: StepResult):
        G, L, W = self.candidates, self.ngram - 1, self.window
        # The logits after the root's and the verified nodes' are the top lookahead level's (`observed_logits`).
        new = sp.argmax(result.logits_BxTxV[:, 1 + G * L:])  # [B, W]
        window = state["window"]
        grams = jnp.concatenate([window, new[:, None]], axis=1)  # [B, N, W]: column j is an n-gram
        # Pool only n-grams whose continuation the target made (the window starts as prompt tokens).
        ready = result.active_B & (state["steps"] >= L - 1)
        pool, count = state["pool"], state["count"]
        for j in range(W):
            pool, count = insert(pool, count, grams[:, 0, j], grams[:, 1:, j], ready)
        window = jnp.concatenate([window[:, 1:], new[:, None]], axis=1)
        return {**state, "window": window, "pool": pool, "count": count, "steps": state["steps"] + 1}


def insert(pool, count, first_B, rest_BxL, do_B):
    """Pool the n-gram (first, rest) per sequence unless already pooled; the oldest slot is replaced."""
    B, _, G, _ = pool.shape
    rows = jnp.arange(B)
    existing = pool[rows, first_B]  # [B, G, L]
    n = count[rows, first_B]
    seen = jnp.any(jnp.all(existing == rest_BxL[:, None], axis=-1) & (jnp.arange(G)[None] < n[:, None]), axis=-1)
    do = do_B & ~seen
    slot = n % G
    old = existing[rows, slot]
    pool = pool.at[rows, first_B, slot].set(jnp.where(do[:, None], rest_BxL, old))
    return pool, count.at[rows, first_B].add(do.astype(jnp.int32))


def candidate_trie(cand_BxGxL: jax.Array, used_BxG: jax.Array):
    """Merge G chains into a trie laid out chain-major: (tokens, parents, valid), each [B, G*L].

    Node (g, d) is kept when no earlier used chain shares its prefix through depth d; its parent is
    the node at depth d-1 of the first used chain sharing the prefix through d-1 (itself, or the
    chain it was merged into). Siblings are therefore distinct, as the point-mass rule needs.
    """
    B, G, L = cand_BxGxL.shape
    same = jnp.cumprod(cand_BxGxL[:, :, None, :] == cand_BxGxL[:, None, :, :], axis=-1).astype(bool)  # [B,G,G,L]
    eye = jnp.eye(G, dtype=bool)[None, :, :, None]
    shares = same & (used_BxG[:, None, :, None] | eye)  # with a used chain g' (or itself)
    owner = jnp.argmax(shares, axis=2)  # [B, G, L]: first chain with this prefix (<= g)
    earlier = (jnp.arange(G)[None, :] < jnp.arange(G)[:, None])[None, :, :, None]
    valid = used_BxG[:, :, None] & ~jnp.any(shares & earlier, axis=2)
    d = jnp.arange(L)[None, None]
    parents = jnp.where(d == 0, -1, jnp.roll(owner, 1, axis=2) * L + d - 1)  # owner at depth d-1
    return (cand_BxGxL.reshape(B, G * L).astype(jnp.int32), parents.reshape(B, G * L).astype(jnp.int32),
            valid.reshape(B, G * L))


@register("lookahead", "Lookahead decoding: Jacobi iteration fills an n-gram pool; pooled n-grams are verified "
          "in the same forward",
          options=(Option("la_window", int, 4, "Jacobi window W (columns)", min=1),
                   Option("la_ngram", int, 4, "n-gram size N (the window keeps N-1 levels)", min=2),
                   Option("la_candidates", int, 4, "n-grams verified per step G", min=1),
                   Option("la_no_prompt_ngrams", bool, False, "start the n-gram pool empty (the paper) instead of "
                          "seeding it with the prompt's")))
def build(opts, target) -> Built:
    return Built(Lookahead(window=opts.la_window, ngram=opts.la_ngram, candidates=opts.la_candidates,
                           seed_from_prompt=not opts.la_no_prompt_ngrams))
