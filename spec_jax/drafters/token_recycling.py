"""`token_recycling`: Token Recycling (Luo et al. 2024, "Turning Trash into Treasure").

The target's logits at every token it is fed hold plausible successors of that token, and most of
them are thrown away. Token Recycling keeps them in an adjacency matrix M[V, k]: row t holds the
top-k successors of t from the most recent forward that saw t. Drafting fills a static
breadth-first tree template by level-wise gathers (a node of rank r under a node holding token t
gets M[t, r]), and after each verification the rows of every fed token are overwritten with the
top-k of the target's logits there. M starts at zero and is kept across requests (hot start): it is
the drafter's `carry`, handed back by `carry_out` after a run and passed to the next one, and
`save_matrix` / `load_matrix` keep it in a file (`--tr-matrix`).

Drafts are deterministic (verified greedily or with the point-mass rule); siblings holding the same
token are marked invalid.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax import sampling as sp
from spec_jax.checks import token_ids_in_range
from spec_jax.drafters.base import StepContext, StepResult, TemplateDrafter, load_int_array
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.files import atomic_write
from spec_jax.models import Config
from spec_jax.trees import TreeTemplate, ancestor_mask

# The paper's default tree: 80 nodes over 6 levels.
DEFAULT_LEVELS = (8, 21, 25, 15, 8, 3)


@dataclasses.dataclass(frozen=True)
class TokenRecycling(TemplateDrafter):
    k: int = 8  # successors kept per token (columns of M)
    levels: tuple[int, ...] = DEFAULT_LEVELS  # nodes per tree level
    paths: tuple[tuple[int, ...], ...] | None = None  # an explicit template (e.g. pruned by --budget auto)
    name = "token_recycling"
    prunable = True

    def __post_init__(self):
        if self.k < 1 or not self.levels or min(self.levels) < 1:
            raise InvalidArgumentError(f"token recycling needs k >= 1 and non-empty levels, got {self.k}, "
                                       f"{self.levels}")

    @property
    def template(self) -> TreeTemplate:
        if self.paths is not None:
            return TreeTemplate(self.paths)
        return TreeTemplate.from_level_sizes(self.levels, width=self.k)

    def with_template(self, template: TreeTemplate) -> TokenRecycling:
        if max(template.ranks, default=0) >= self.k:
            raise InvalidArgumentError(f"template uses rank {max(template.ranks)} but the matrix keeps k={self.k}")
        return dataclasses.replace(self, paths=template.paths)

    def check(self, cfg: Config, weights, carry) -> None:
        if carry is None:
            return
        if tuple(carry.shape) != (cfg.vocab_size, self.k):
            raise InvalidArgumentError(
                f"token recycling matrix has shape {tuple(carry.shape)}, expected ({cfg.vocab_size}, {self.k}) "
                "for this model and k; delete the matrix file or pass the matching --tr-k")
        if isinstance(carry, np.ndarray):  # a file or caller's array (a device array is the engine's own carry)
            token_ids_in_range(carry, cfg.vocab_size, "token recycling matrix", "; delete the matrix file to start "
                               "from zeros")

    def init(self, weights, carry, cfg: Config, batch: int, cache_size: int):
        M = jnp.zeros((cfg.vocab_size, self.k), jnp.int32) if carry is None else jnp.asarray(carry, jnp.int32)
        return {"M": M}

    def carry_out(self, state):
        """The matrix after a run: the next run's carry (hot start)."""
        return state["M"]

    # ------------------------------------------------------------------ drafting

    def propose(self, weights, state, ctx: StepContext):
        tmpl = self.template
        tokens_BxN = fill_template(state["M"], ctx.pending_B, tmpl)
        return tmpl.build(tokens_BxN, valid_BxN=distinct_siblings(tokens_BxN, tmpl.parents)), state, ctx.cache

    # ------------------------------------------------------------------ update

    def observe(self, weights, state, result: StepResult):
        fed_valid_BxT = jnp.concatenate([jnp.ones_like(result.tree.valid[:, :1]), result.tree.valid], axis=1)
        fed_valid_BxT &= result.active_B[:, None]
        # Every fed token's row is overwritten (the reference implementation's `adj_matrix[input_ids] =
        # topk(logits)`), so every slot's top-k is needed; `sp.top_k` finds it blockwise, exactly.
        top_BxTxK = sp.top_k(result.logits_BxTxV, self.k)[1].astype(jnp.int32)
        return {**state, "M": update_matrix(state["M"], result.inputs_BxT, top_BxTxK, fed_valid_BxT)}


def fill_template(M_VxK: jax.Array, root_B: jax.Array, tmpl: TreeTemplate, chain_BxD: jax.Array | None = None,
                  use_chain_BxD: jax.Array | None = None) -> jax.Array:
    """Node tokens [B, N] by level-wise gathers: a node of rank r under a node holding t gets M[t, r].

    With `chain`, the template's rank-0 path (nodes (0,), (0, 0), ...) holds chain[:, d-1] at depth
    d where `use_chain` says so, and the nodes below it are gathered from those tokens (how `sam_tr`
    hangs a retrieved continuation into the recycled tree).
    """
    parents, depth, ranks = tmpl.parents, tmpl.depth, tmpl.ranks
    index = {p: i for i, p in enumerate(tmpl.paths)}
    B, N = root_B.shape[0], tmpl.num_nodes
    tokens = jnp.zeros((B, N), jnp.int32)
    for d in range(1, tmpl.max_depth + 1):
        idx = np.flatnonzero(depth == d)
        parent_tok = root_B[:, None].repeat(len(idx), 1) if d == 1 else tokens[:, parents[idx]]
        tokens = tokens.at[:, idx].set(M_VxK[parent_tok, ranks[idx]])
        spine = index.get((0,) * d)
        if chain_BxD is not None and spine is not None and d <= chain_BxD.shape[1]:
            tokens = tokens.at[:, spine].set(jnp.where(use_chain_BxD[:, d - 1], chain_BxD[:, d - 1], tokens[:, spine]))
    return tokens


def distinct_siblings(tokens_BxN: jax.Array, parents: np.ndarray) -> jax.Array:
    """Valid nodes: no earlier sibling holds the same token, and the parent is valid."""
    N = len(parents)
    earlier_sibling = (parents[:, None] == parents[None, :]) & (np.arange(N)[None, :] < np.arange(N)[:, None])
    dup = jnp.any((tokens_BxN[:, :, None] == tokens_BxN[:, None, :]) & earlier_sibling[None], axis=2)
    return ~jnp.any(ancestor_mask(parents)[None] & dup[:, None, :], axis=2)  # no duplicate on the path


def update_matrix(M_VxK: jax.Array, fed_BxT: jax.Array, top_BxTxK: jax.Array, valid_BxT: jax.Array) -> jax.Array:
    """Overwrite M[t] with the top-k successors observed after t, for every valid fed token t.

    When a token was fed more than once in the step (in one sequence or across the batch), its last
    occurrence in (batch, slot) order wins, so the update is deterministic.
    """
    V = M_VxK.shape[0]
    tok = fed_BxT.reshape(-1)
    top = top_BxTxK.reshape(-1, top_BxTxK.shape[-1])
    ok = valid_BxT.reshape(-1)
    order = jnp.arange(tok.shape[0])
    # Each token's last valid occurrence, by a scatter-max over V + 1 rows (O(B T + V) memory; an all-pairs
    # comparison took (B T)^2, 10 GB for a batch of 10,000 sequences and 10 fed slots).
    last_V = jnp.full((V + 1,), -1, order.dtype).at[jnp.where(ok, tok, V)].max(order)
    row = jnp.where(ok & (last_V[tok] == order), tok, V)  # row V is out of range: the write is dropped
    return M_VxK.at[row].set(top, mode="drop")  # in place: the matrix is not copied


def save_matrix(M, path: str | os.PathLike) -> Path:
    """Write the matrix as .npy (atomically)."""
    def write(tmp: Path):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name without it
            np.save(f, np.asarray(M, np.int32))

    return atomic_write(path, write)


def load_matrix(path: str | os.PathLike, vocab_size: int, k: int) -> np.ndarray:
    """A saved matrix, refused unless it is [vocab_size, k] of ids within the vocabulary (an id outside it
    would index past the model's embedding table: the draft would be garbage and the matrix update
    dropped, never an error)."""
    hint = "; delete it to start from zeros"
    M = load_int_array(path, 2, "token recycling matrix [vocab, k]", hint)
    if M.shape != (vocab_size, k):
        raise DataFormatError(f"{path}: token recycling matrix has shape {M.shape}, expected ({vocab_size}, {k}) "
                              f"for this model and --tr-k {k}; pass the matching --tr-k or delete the file")
    token_ids_in_range(M, vocab_size, str(path), hint)
    return M


# ----------------------------------------------------------------------------- registry

TR_OPTIONS = (
    Option("tr_k", int, 8, "successors kept per token (columns of the matrix)", min=1),
    Option("tr_levels", str, ",".join(map(str, DEFAULT_LEVELS)), "tree nodes per level (comma-separated)"),
    Option("tr_matrix", str, None, "adjacency-matrix file (.npy): loaded if it exists, saved after the run",
           path="read_write"),
)


def _levels(opts) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in str(opts.tr_levels).split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise InvalidArgumentError(f"--tr-levels takes comma-separated positive integers (nodes per tree level), "
                                   f"got {opts.tr_levels!r}")
    return levels


def check_recycling(opts, cfg: Config) -> None:
    """--tr-levels make a tree; a --tr-matrix file fits the model and --tr-k."""
    _levels(opts)
    if opts.tr_matrix and Path(opts.tr_matrix).exists():
        load_matrix(opts.tr_matrix, cfg.vocab_size, opts.tr_k)


def recycling_settings(opts, cfg: Config) -> tuple[tuple[int, ...], np.ndarray | None, object]:
    """(tree levels, the matrix from --tr-matrix if the file exists, the save hook) for token_recycling
    and sam_tr."""
    path = opts.tr_matrix
    matrix = load_matrix(path, cfg.vocab_size, opts.tr_k) if path and Path(path).exists() else None
    return _levels(opts), matrix, (lambda M: save_matrix(M, path)) if path else None


@register("token_recycling", "Token Recycling: a static tree filled from an adjacency matrix of the "
          "target's recent top-k successors (hot start across requests)", options=TR_OPTIONS,
          check=check_recycling, prunable=True)
def build(opts, target) -> Built:
    levels, matrix, save = recycling_settings(opts, target.cfg)
    return Built(TokenRecycling(k=opts.tr_k, levels=levels), carry=matrix, save=save)
