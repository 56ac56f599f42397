"""Dynamic draft trees grown at run time under a node budget (EAGLE-2, Li et al. 2024; DySpec).

A drafting model expands the tree level by level: at each depth the `width` candidates with the
highest cumulative draft log-probability are fed to it together (one forward with a tree mask
over the scratch entries of their ancestors), and each gets `k` children. At the end the
`budget` candidates with the highest cumulative log-probability are kept; cumulative scores never
increase along a path, so the kept set is closed under ancestors and forms a tree.

Children are either the draft's top-k (deterministic: verified with the point-mass rule, or
greedily) or `k` i.i.d. samples from the draft distribution q (verified by recursive rejection
sampling, SpecInfer). With sampled children a node's siblings must be kept or dropped together
(dropping one sample because of its value would bias the rest), so that mode keeps every
candidate and the budget is the full expansion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from spec_jax import sampling as sp
from spec_jax.drafters.registry import Option
from spec_jax.errors import InvalidArgumentError
from spec_jax.trees import DraftTree, ancestor_mask_from_parents

# tree_step(cache, tokens[B, W], positions[B, W], tree_mask[B, W, C], parent_slots[B, W]) -> (logits[B, W, V],
# cache): the W tokens attend to the committed cache and to the scratch slots their mask row allows; their
# entries are written at the last W of the C scratch slots. `parent_slots` is the scratch slot of each token's
# parent (-1: the root), for drafters that feed a node what its parent computed (EAGLE's features). `cache` is
# any pytree the drafter threads through.
TreeStep = Callable


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """Shape bounds of a dynamic tree: `depth` levels, `width` nodes expanded per level, `k`
    children per expanded node, `budget` nodes kept (deterministic children only)."""

    depth: int = 4
    width: int = 4
    k: int = 4
    budget: int = 12
    sampled: bool = False  # children drawn i.i.d. from q instead of q's top-k

    def __post_init__(self):
        if min(self.depth, self.width, self.k, self.budget) < 1:
            raise InvalidArgumentError(f"dynamic tree sizes must be >= 1, got {self}")
        if self.width > self.k:
            raise InvalidArgumentError(f"width {self.width} > k {self.k}: the first level has only k candidates")
        if self.budget > self.num_candidates and not self.sampled:
            raise InvalidArgumentError(
                f"budget {self.budget} exceeds the {self.num_candidates} candidates that depth "
                f"{self.depth}, width {self.width} and k {self.k} produce")

    @property
    def num_candidates(self) -> int:
        return self.k + (self.depth - 1) * self.width * self.k

    @property
    def num_nodes(self) -> int:
        return self.num_candidates if self.sampled else self.budget

    @property
    def num_fed(self) -> int:
        """Scratch entries the drafting model writes (every expanded node)."""
        return (self.depth - 1) * self.width


def _children(key, logits_BxWxV, spec: DynamicTree, s: sp.Sampling):
    """k children per expanded node: (tokens, log q of each, q or None), each [B, W*k(, V)]."""
    B, W, V = logits_BxWxV.shape
    q_BxWxV = sp.probs(logits_BxWxV, s) if not s.greedy else jax.nn.softmax(logits_BxWxV, -1)
    logq_BxWxV = jnp.log(jnp.maximum(q_BxWxV, 1e-30))
    if spec.sampled:
        toks_BxWxk = jax.random.categorical(key, logq_BxWxV[:, :, None, :], axis=-1, shape=(B, W, spec.k))
        toks_BxWxk = toks_BxWxk.astype(jnp.int32)
        qs = jnp.broadcast_to(q_BxWxV[:, :, None, :], (B, W, spec.k, V)).reshape(B, W * spec.k, V)
    else:
        toks_BxWxk = jax.lax.top_k(logq_BxWxV, spec.k)[1].astype(jnp.int32)
        qs = None
    logq_BxWxk = jnp.take_along_axis(logq_BxWxV, toks_BxWxk, axis=2)
    return toks_BxWxk.reshape(B, W * spec.k), logq_BxWxk.reshape(B, W * spec.k), qs


def draft_dynamic_tree(tree_step: TreeStep, cache, root_logits_BxV, root_position_B, spec: DynamicTree,
                       s: sp.Sampling, rng, depth_limit_B=None) -> tuple[DraftTree, jax.Array, object]:
    """Grow a tree below the root; returns it, each node's scratch offset (-1: not fed), and the cache.

    `root_logits` are the drafting model's logits for the root's successors; node positions are
    `root_position + depth`. Candidates are kept in breadth-first lists (one entry per level) of
    tokens, cumulative log q scores, parent candidate indices, depths, q rows and fed slots.

    `depth_limit_B` ([B] int, from a draft-structure predictor: AdaEAGLE) caps each sequence's tree:
    candidates deeper than its limit are never kept (the budget goes to the best ones within it; when
    fewer remain, the surplus nodes are invalid), and a level no sequence needs is not fed at all.
    """
    B = root_logits_BxV.shape[0]
    limit_B = None if depth_limit_B is None else jnp.clip(depth_limit_B, 1, spec.depth).astype(jnp.int32)
    W, k = spec.width, spec.k
    keys = jax.random.split(rng, spec.depth)
    toks_BxC, score_BxC, qs = _children(keys[0], root_logits_BxV[:, None], spec, s)
    cand_tok, cand_score, cand_parent = [toks_BxC], [score_BxC], [jnp.full((B, k), -1, jnp.int32)]
    cand_depth, cand_q, cand_fed = [jnp.ones((B, k), jnp.int32)], [qs], [jnp.full((B, k), -1, jnp.int32)]
    fed_mask_BxFxF = jnp.zeros((B, 0, 0), bool)  # among fed slots: row i sees its fed ancestors and itself
    level_tok_BxC, level_score_BxC, level_start = toks_BxC, score_BxC, 0
    level_parent_fed_BxC = cand_fed[0]  # fed slot of each level candidate's parent (-1: the root)
    for d in range(1, spec.depth):
        # Expand the `width` best candidates of the current level.
        n_fed = fed_mask_BxFxF.shape[1]
        top_BxW = jax.lax.top_k(level_score_BxC, W)[1]  # indices within the level
        f_tok_BxW = jnp.take_along_axis(level_tok_BxC, top_BxW, 1)
        f_score_BxW = jnp.take_along_axis(level_score_BxC, top_BxW, 1)
        f_parent_slot_BxW = jnp.take_along_axis(level_parent_fed_BxC, top_BxW, 1)
        padded = jnp.pad(fed_mask_BxFxF, ((0, 0), (0, 1), (0, 0)))  # row n_fed: the root's (sees nothing)
        parent_rows_BxWxF = jnp.take_along_axis(
            padded, jnp.where(f_parent_slot_BxW < 0, n_fed, f_parent_slot_BxW)[:, :, None], axis=1)
        rows_BxWxF = jnp.concatenate([parent_rows_BxWxF, jnp.broadcast_to(jnp.eye(W, dtype=bool), (B, W, W))],
                                     axis=2)  # F grows by W: the new rows see their ancestors and themselves
        fed_mask_BxFxF = jnp.concatenate([jnp.pad(fed_mask_BxFxF, ((0, 0), (0, 0), (0, W))), rows_BxWxF], axis=1)
        # Record which level candidates were fed and where.
        slots_W = n_fed + jnp.arange(W, dtype=jnp.int32)
        cand_fed[-1] = jnp.full(level_tok_BxC.shape, -1, jnp.int32).at[jnp.arange(B)[:, None], top_BxW].set(
            slots_W[None])
        positions_BxW = (root_position_B + d)[:, None] + jnp.zeros((B, W), jnp.int32)
        logits_BxWxV, cache = _level(tree_step, cache, (f_tok_BxW, positions_BxW, rows_BxWxF, f_parent_slot_BxW),
                                     None if limit_B is None else jnp.any(limit_B > d))
        toks_BxC, logq_BxC, qs = _children(keys[d], logits_BxWxV, spec, s)
        score_BxC = jnp.repeat(f_score_BxW, k, axis=1) + logq_BxC
        parent_idx_BxW = level_start + top_BxW  # candidate index of each expanded node
        cand_tok.append(toks_BxC)
        cand_score.append(score_BxC)
        cand_parent.append(jnp.repeat(parent_idx_BxW, k, axis=1).astype(jnp.int32))
        cand_depth.append(jnp.full((B, W * k), d + 1, jnp.int32))
        cand_q.append(qs)
        cand_fed.append(jnp.full((B, W * k), -1, jnp.int32))
        level_start += level_tok_BxC.shape[1]
        level_tok_BxC, level_score_BxC = toks_BxC, score_BxC
        level_parent_fed_BxC = jnp.broadcast_to(jnp.repeat(slots_W, k), (B, W * k))

    cat = lambda xs: jnp.concatenate(xs, axis=1)
    tok_BxM, score_BxM, parent_BxM, depth_BxM, fed_BxM = map(cat, (cand_tok, cand_score, cand_parent, cand_depth,
                                                                    cand_fed))
    allowed_BxM = jnp.ones(depth_BxM.shape, bool) if limit_B is None else depth_BxM <= limit_B[:, None]
    if spec.sampled:  # siblings are kept together: the whole expansion is the tree (levels past the limit invalid)
        return _tree(tok_BxM, parent_BxM, depth_BxM, cat(cand_q), allowed_BxM), fed_BxM, cache
    # Keep the best `budget` candidates; a tiny depth penalty breaks parent/child ties toward the parent.
    # Candidates past the depth limit rank below every allowed one (kept only as invalid padding).
    score_BxM = jnp.where(allowed_BxM, score_BxM - 1e-6 * depth_BxM, -jnp.inf)
    keep_BxN = jax.lax.top_k(score_BxM, spec.budget)[1]
    # Breadth-first (parents first, depths non-decreasing), best first within a level: slot i's acceptance
    # rate then ranks like the node's score, which `--budget auto` prunes by.
    kept_depth_BxN, kept_score_BxN = (jnp.take_along_axis(a, keep_BxN, 1) for a in (depth_BxM, score_BxM))
    order_BxN = jax.vmap(lambda d, s: jnp.lexsort((-s, d)))(kept_depth_BxN, kept_score_BxN)
    keep_BxN = jnp.take_along_axis(keep_BxN, order_BxN, 1)
    new_index_BxM = jax.vmap(lambda kp: jnp.full((tok_BxM.shape[1],), -1, jnp.int32).at[kp].set(
        jnp.arange(spec.budget, dtype=jnp.int32)))(keep_BxN)
    take = lambda a: jnp.take_along_axis(a, keep_BxN, axis=1)
    kept_parent_BxN = take(parent_BxM)
    new_parent_BxN = jnp.where(kept_parent_BxN < 0, -1,
                               jnp.take_along_axis(new_index_BxM, jnp.maximum(kept_parent_BxN, 0), 1))
    return _tree(take(tok_BxM), new_parent_BxN, take(depth_BxM), None, take(allowed_BxM)), take(fed_BxM), cache


def _level(tree_step: TreeStep, carry, inputs, needed):
    """One level's `tree_step`, or, when `needed` (a traced bool; None: always) is False, nothing: zero logits
    and the carry as it was, any leaf the step grows (per-level outputs appended at the end) padded with zeros.
    The skipped level's candidates lie past every sequence's depth limit, so its logits are never used."""
    if needed is None:
        return tree_step(carry, *inputs)
    out_shape = jax.eval_shape(lambda c: tree_step(c, *inputs), carry)

    def skip(c):
        grown = jax.tree.map(lambda x, o: jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, o.shape, strict=True)])
                             .astype(o.dtype), c, out_shape[1])
        return jnp.zeros(out_shape[0].shape, out_shape[0].dtype), grown

    return jax.lax.cond(needed, lambda c: tree_step(c, *inputs), skip, carry)


def _tree(tokens_BxN, parents_BxN, depth_BxN, q, valid_BxN) -> DraftTree:
    return DraftTree(tokens=tokens_BxN, parents=parents_BxN, depth=depth_BxN,
                     mask=ancestor_mask_from_parents(parents_BxN), valid=valid_BxN, q=q)


def tree_options(depth: int = 4, width: int = 4, k: int = 4, budget: int = 12) -> tuple[Option, ...]:
    """The dynamic-tree flags, with a method's own defaults."""
    return (
        Option("tree_depth", int, depth, "levels of the dynamic tree", min=1),
        Option("tree_width", int, width, "nodes expanded per level", min=1),
        Option("tree_k", int, k, "children per expanded node", min=1),
        Option("tree_budget", int, budget, "nodes kept for verification (--budget N|auto sets it)", min=1),
        Option("sampled_children", bool, False, "draw children i.i.d. from the draft (recursive rejection "
               "sampling) instead of its top-k; keeps the whole expansion"),
    )


TREE_OPTIONS = tree_options()


def check_tree(opts) -> None:
    """The tree options agree with one another (`DynamicTree`'s constraints, named by their flags)."""
    if opts.tree_width > opts.tree_k:
        raise InvalidArgumentError(f"--tree-width {opts.tree_width} > --tree-k {opts.tree_k}: the first level has "
                                   "only --tree-k candidates to expand")
    n = DynamicTree(depth=opts.tree_depth, width=opts.tree_width, k=opts.tree_k, sampled=True).num_candidates
    if opts.tree_budget > n and not opts.sampled_children:
        raise InvalidArgumentError(
            f"--tree-budget {opts.tree_budget} exceeds the {n} candidates that --tree-depth {opts.tree_depth}, "
            f"--tree-width {opts.tree_width} and --tree-k {opts.tree_k} produce; lower it or grow the tree")
