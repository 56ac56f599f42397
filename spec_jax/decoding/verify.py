"""Lossless verification of draft trees against target logits (vectorised over the batch, jittable).

Slots: index 0 is the root (the pending token), slot i+1 is draft node i. A result's `path[b, j]`
is the slot accepted at depth j (path[:, 0] = 0), valid for j <= num_accepted[b].

Rules (DESIGN.md, "Verification rules"):
- greedy: accept the child equal to the target argmax at its parent;
- sampled drafts (node i drawn from q_i): accept with min(1, p(x)/q_i(x)); on rejection
  p <- norm(max(0, p - q_i)) and try the next sibling (SpecInfer's multi-step speculative sampling;
  a chain is the one-sibling case, Leviathan et al. 2023 / Chen et al. 2023);
- deterministic drafts (q is a point mass): accept with p(x); on rejection p(x) <- 0 and renormalise;
- when no child is accepted (or there is none) the next token is sampled from the residual p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from spec_jax import sampling as sp
from spec_jax.trees import DraftTree

# "lossless" (the rules above) or "typical": Medusa-2's typical acceptance, LOSSY, opt-in only.
VERIFY_MODES = ("lossless", "typical")


@struct.dataclass
class VerifyResult:
    path_BxP: jax.Array  # [B, D+1] accepted slots by depth, path[:, 0] = 0 (root)
    num_accepted_B: jax.Array  # accepted draft nodes
    next_token_B: jax.Array  # bonus or corrected token


def verify(tree: DraftTree, logits_BxTxV: jax.Array, s: sp.Sampling, rng: jax.Array,
           max_depth: int, mode: str = "lossless", typical=(0.09, 0.3)) -> VerifyResult:
    """Accepted path, accepted count and next token for each sequence.

    `mode="typical"` is Medusa-2's typical acceptance (Cai et al. 2024): LOSSY (the output distribution
    is not the target's), opt-in only. `typical = (epsilon, delta)`: accept x when
    p(x) > min(epsilon, delta * exp(-H(p))), p the target's temperature-processed distribution
    (softmax of the raw logits under greedy decoding).
    """
    if mode == "typical":
        return _verify_typical(tree, logits_BxTxV, s, rng, max_depth, *typical)
    if mode != "lossless":
        raise ValueError(f"unknown verification mode {mode!r}; use one of {VERIFY_MODES}")
    if s.greedy:
        return _verify_greedy(tree, logits_BxTxV, max_depth)
    p_BxTxV = sp.probs(logits_BxTxV, s)
    rngs = jax.random.split(rng, tree.tokens.shape[0])
    return jax.vmap(_verify_sampled, in_axes=(0, 0, 0, 0, 0 if tree.q is not None else None, 0, 0,
                                              None))(
        tree.tokens, tree.parents, tree.depth, tree.valid, tree.q, p_BxTxV, rngs, max_depth)


def _walk(tree: DraftTree, choose, max_depth: int):
    """Descend the tree level by level, accepting the first child of the current slot that `choose` allows."""
    B = tree.tokens.shape[0]
    cur_B = jnp.zeros((B,), jnp.int32)
    alive_B = jnp.ones((B,), bool)
    path = [cur_B]
    parent_slot_BxN = tree.parents + 1
    for d in range(1, max_depth + 1):
        cand_BxN = tree.valid & (tree.depth == d) & (parent_slot_BxN == cur_B[:, None]) & choose(cur_B)
        found_B = alive_B & jnp.any(cand_BxN, axis=1)
        nxt_B = (jnp.argmax(cand_BxN, axis=1) + 1).astype(jnp.int32)
        cur_B = jnp.where(found_B, nxt_B, cur_B)
        alive_B = found_B
        path.append(jnp.where(found_B, nxt_B, 0))
    path_BxP = jnp.stack(path, axis=1)
    return path_BxP, cur_B, jnp.sum(path_BxP[:, 1:] > 0, axis=1).astype(jnp.int32)


def _verify_greedy(tree, logits_BxTxV, max_depth):
    target_BxT = sp.argmax(logits_BxTxV)
    at = lambda cur_B: jnp.take_along_axis(target_BxT, cur_B[:, None], axis=1)
    path_BxP, cur_B, n_B = _walk(tree, lambda cur_B: tree.tokens == at(cur_B), max_depth)
    return VerifyResult(path_BxP=path_BxP, num_accepted_B=n_B, next_token_B=at(cur_B)[:, 0])


def _verify_typical(tree, logits_BxTxV, s, rng, max_depth, epsilon, delta):
    p_BxTxV = sp.probs(logits_BxTxV, s) if not s.greedy else jax.nn.softmax(logits_BxTxV.astype(jnp.float32), -1)
    threshold_BxT = jnp.minimum(epsilon, delta * jnp.exp(-sp.entropy(p_BxTxV)))
    p_at = lambda cur_B: jnp.take_along_axis(p_BxTxV, cur_B[:, None, None], axis=1)[:, 0]  # [B, V]

    def choose(cur_B):
        p_nodes_BxN = jnp.take_along_axis(p_at(cur_B), tree.tokens, axis=1)
        return p_nodes_BxN > jnp.take_along_axis(threshold_BxT, cur_B[:, None], axis=1)

    path_BxP, cur_B, n_B = _walk(tree, choose, max_depth)
    p_cur_BxV = p_at(cur_B)
    nxt_B = jnp.argmax(p_cur_BxV, -1) if s.greedy else sp.sample(rng, p_cur_BxV)
    return VerifyResult(path_BxP=path_BxP, num_accepted_B=n_B, next_token_B=nxt_B.astype(jnp.int32))


def _residual(p, q_or_none, token):
    """Target mass left after rejecting `token` drawn from q (point mass when q is None)."""
    if q_or_none is None:
        r = p.at[token].set(0.0)
    else:
        r = jnp.maximum(p - q_or_none, 0.0)
    total = jnp.sum(r)
    return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p)


def _verify_sampled(tokens_N, parents_N, depth_N, valid_N, q_NxV, p_TxV, rng, max_depth):
    """One sequence: a single pass over the nodes in breadth-first order."""
    n_nodes = tokens_N.shape[0]
    keys = jax.random.split(rng, n_nodes + 1)

    def body(i, carry):
        cur, p, path, n = carry
        x = tokens_N[i]
        q = None if q_NxV is None else q_NxV[i]
        qx = 1.0 if q is None else q[x]
        tried = valid_N[i] & (parents_N[i] + 1 == cur)
        # Accept with probability min(1, p(x) / q(x)).
        accept = tried & (jax.random.uniform(keys[i]) * qx < p[x])
        p = jnp.where(accept, p_TxV[i + 1], jnp.where(tried, _residual(p, q, x), p))
        path = jnp.where(accept, path.at[depth_N[i]].set(i + 1), path)
        return jnp.where(accept, i + 1, cur), p, path, n + accept.astype(jnp.int32)

    init = (jnp.int32(0), p_TxV[0], jnp.zeros((max_depth + 1,), jnp.int32), jnp.int32(0))
    cur, p, path, n = jax.lax.fori_loop(0, n_nodes, body, init) if n_nodes else init
    return VerifyResult(path_BxP=path, num_accepted_B=n, next_token_B=sp.sample(keys[-1], p).astype(jnp.int32))
