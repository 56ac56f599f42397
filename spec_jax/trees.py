"""Draft trees: the vocabulary shared by drafters and the verification engine.

A `DraftTree` holds N drafted nodes per sequence below an implicit root (the pending token whose
successors are being drafted). Nodes are in breadth-first order: `parents[i] < i` (-1 for children
of the root) and depths are non-decreasing, which lets verification walk the tree in one pass.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spec_jax.errors import InvalidArgumentError


@struct.dataclass
class DraftTree:
    """Drafted nodes of a batch of trees (see module docstring for the ordering invariant)."""

    tokens: jax.Array  # [B, N] int32
    parents: jax.Array  # [B, N] int32, -1 = child of the root
    depth: jax.Array  # [B, N] int32, 1 for children of the root
    mask: jax.Array  # [B, N, N] bool, mask[b, i, j]: j is i or an ancestor of i
    valid: jax.Array  # [B, N] bool, False for padding nodes (never accepted)
    # Draft distribution each node was sampled from ([B, N, V]); None: deterministic drafts
    # (verified with the point-mass rule).
    q: jax.Array | None = None

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def first(self, n: int) -> DraftTree:
        """The tree of the first `n` nodes (itself when it has no more)."""
        if n >= self.num_nodes:
            return self
        return DraftTree(tokens=self.tokens[:, :n], parents=self.parents[:, :n], depth=self.depth[:, :n],
                         mask=self.mask[:, :n, :n], valid=self.valid[:, :n],
                         q=None if self.q is None else self.q[:, :n])


@dataclasses.dataclass(frozen=True)
class TreeTemplate:
    """A static tree shape given as rank paths: node (0, 2) is the 3rd-ranked child of the top-1 child.

    Medusa-style choice lists, chains and k-ary trees are all rank-path lists. Drafters that fill
    a template pick, for each node, the candidate of that rank under the node's parent.
    """

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        paths = tuple(sorted({tuple(p) for p in self.paths}, key=lambda p: (len(p), p)))
        for p in paths:
            if not p or min(p) < 0:
                raise InvalidArgumentError(f"invalid tree path {p}: ranks must be >= 0, paths non-empty")
            if len(p) > 1 and p[:-1] not in paths:
                raise InvalidArgumentError(f"tree path {p} has no parent {p[:-1]} in the template")
        object.__setattr__(self, "paths", paths)

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def parents(self) -> np.ndarray:
        index = {p: i for i, p in enumerate(self.paths)}
        return np.array([index[p[:-1]] if len(p) > 1 else -1 for p in self.paths], np.int32)

    @property
    def depth(self) -> np.ndarray:
        return np.array([len(p) for p in self.paths], np.int32)

    @property
    def ranks(self) -> np.ndarray:
        return np.array([p[-1] for p in self.paths], np.int32)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return tuple(int(np.sum(self.depth == d)) for d in range(1, self.max_depth + 1))

    def ancestor_mask(self) -> np.ndarray:
        return ancestor_mask(self.parents)

    def build(self, tokens_BxN: jax.Array, q=None, valid_BxN=None) -> DraftTree:
        """A DraftTree of this shape holding the given tokens."""
        B, N = tokens_BxN.shape
        bcast = lambda a: jnp.broadcast_to(jnp.asarray(a), (B, *a.shape))
        return DraftTree(
            tokens=tokens_BxN.astype(jnp.int32), parents=bcast(self.parents), depth=bcast(self.depth),
            mask=bcast(self.ancestor_mask()),
            valid=jnp.ones((B, N), bool) if valid_BxN is None else valid_BxN, q=q)

    # ----------------------------------------------------------------- constructors

    @classmethod
    def chain(cls, k: int) -> TreeTemplate:
        """K drafted tokens in a line."""
        if k < 0:
            raise InvalidArgumentError(f"chain length must be >= 0, got {k}")
        return cls(tuple((0,) * d for d in range(1, k + 1)))

    @classmethod
    def kary(cls, branching: tuple[int, ...]) -> TreeTemplate:
        """Full tree with branching[d] children per node at depth d+1."""
        paths = []
        for depth in range(1, len(branching) + 1):
            paths += itertools.product(*(range(b) for b in branching[:depth]))
        return cls(tuple(paths))

    @classmethod
    def from_level_sizes(cls, sizes: tuple[int, ...], width: int = 8) -> TreeTemplate:
        """The `sizes[d]` most promising paths per depth, expanding ranks below `width`.

        Paths are scored by a rank prior prod(1 / (rank + 1)) (a top-ranked successor is the
        likeliest to be accepted), as in Medusa's and Token Recycling's static trees, and a level
        only extends nodes of the level above.
        """
        chosen: list[tuple[int, ...]] = []
        frontier = [()]
        for size in sizes:
            cands = [p + (r,) for p in frontier for r in range(width)]
            cands.sort(key=lambda p: (-rank_prior(p), p))
            frontier = cands[:size]
            chosen += frontier
        return cls(tuple(chosen))


def rank_prior(path: tuple[int, ...]) -> float:
    """prod(1 / (rank + 1)) over a rank path: how promising a static-tree node is a priori."""
    return float(np.prod([1.0 / (r + 1) for r in path]))


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """[N, N] bool: mask[i, j] iff j is i or an ancestor of i (parents[i] < i)."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def ancestor_mask_from_parents(parents_BxN: jax.Array) -> jax.Array:
    """Traced `ancestor_mask` for trees built at run time: [B, N, N] from parents[B, N] (-1 = root)."""
    B, N = parents_BxN.shape
    step = jnp.eye(N, dtype=jnp.float32) + jax.nn.one_hot(parents_BxN, N, dtype=jnp.float32)  # -1 -> zeros
    mask = jnp.broadcast_to(step, (B, N, N))
    for _ in range(max(1, int(np.ceil(np.log2(max(N, 2)))))):  # transitive closure by squaring
        mask = (jnp.einsum("bij,bjk->bik", mask, mask) > 0).astype(jnp.float32)
    return mask > 0


def with_root(tree: DraftTree, root_tokens_B: jax.Array, lengths_B: jax.Array):
    """Verification inputs: tokens, positions and mask for [root, nodes] ([B, 1+N] each)."""
    B, N = tree.tokens.shape
    tokens = jnp.concatenate([root_tokens_B[:, None], tree.tokens], axis=1)
    positions = lengths_B[:, None] + jnp.concatenate(
        [jnp.zeros((B, 1), jnp.int32), tree.depth], axis=1)
    node_rows = jnp.concatenate([jnp.ones((B, N, 1), bool), tree.mask], axis=2)
    root_row = jnp.zeros((B, 1, N + 1), bool).at[:, :, 0].set(True)
    return tokens, positions, jnp.concatenate([root_row, node_rows], axis=1)
