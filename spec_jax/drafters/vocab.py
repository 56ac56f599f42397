"""Reduced draft vocabularies: a draft head reads out only the most frequent tokens (FR-Spec, Zhao et al.
2025; EAGLE-3's `d2t`).

A small drafter's LM head is the bulk of its cost: SmolLM2's 49,152 x 576 head is 21% of a whole target
forward on this CPU and nearly all of a Medusa step. Restricting the drafts to the `Vd` most frequent tokens
of the training data divides that by V / Vd, and loses only the drafts of rare tokens, which are rarely
accepted anyway. Verification stays on the full vocabulary, so decoding stays lossless: the drafts are
deterministic (top-k) and the target decides.

A token ranking (every token id, most frequent first, from the answer tokens of the training data) travels
with trained heads as `token_ranking.npy` (`head_checkpoints.save_heads`); `--draft-vocab N` keeps its first
N. The drafter's weights then carry `{"d2t": int32 [Vd], "head": [Vd, E]}` under `"vocab"`: the kept ids
(draft index -> target id) and the rows of the target's LM head for them, taken once at build time
(`reduced_vocab`), never stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.drafters.base import load_int_array
from spec_jax.drafters.head_checkpoints import RANKING_FILE
from spec_jax.drafters.registry import Option
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.models import Config


def token_ranking(counts_V: np.ndarray) -> np.ndarray:
    """Every token id, most frequent first (ties: the smaller id first), as int32 [V]."""
    counts_V = np.asarray(counts_V)
    return np.lexsort((np.arange(counts_V.size), -counts_V)).astype(np.int32)


def count_answer_tokens(tokens_RxL: np.ndarray, mask_RxL: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each token id occurs where `mask` holds (the answer tokens a draft head learns to draft)."""
    return np.bincount(np.asarray(tokens_RxL)[np.asarray(mask_RxL, bool)], minlength=vocab_size)[:vocab_size]


def load_ranking(directory: str | os.PathLike, cfg: Config) -> np.ndarray:
    """A heads directory's token ranking, checked to be a permutation of this model's vocabulary."""
    path = Path(directory) / RANKING_FILE
    if not path.is_file():
        raise InvalidArgumentError(f"{directory}: no {RANKING_FILE}, so no reduced draft vocabulary can be taken "
                                   "from it; omit --draft-vocab, or use heads trained by a recipe (which writes one)")
    ranking = load_int_array(path, 1, "token ranking")
    if ranking.size != cfg.vocab_size or not np.array_equal(np.sort(ranking), np.arange(cfg.vocab_size)):
        raise DataFormatError(f"{path}: not a ranking of this model's {cfg.vocab_size} token ids (holds {ranking.size}"
                              " ids); it belongs to heads of another model")
    return ranking.astype(np.int32)


def check_size(size: int, cfg: Config, flag: str = "--draft-vocab") -> None:
    if not 0 <= size <= cfg.vocab_size:
        raise InvalidArgumentError(f"{flag} {size}: the model's vocabulary has {cfg.vocab_size} tokens; give 0 "
                                   "(the full vocabulary) or a size up to that")


def lm_head_rows(target_params, cfg: Config, ids_Vd) -> jax.Array:
    """[Vd, E]: the rows of the target's LM head (the tied embedding, or the head's kernel columns) for `ids`."""
    if cfg.tie_word_embeddings:
        return jnp.take(target_params["embed_tokens"]["embedding"], ids_Vd, axis=0)
    return jnp.take(target_params["lm_head"]["kernel"], ids_Vd, axis=1).T


def reduced_vocab(target_params, cfg: Config, ranking_V: np.ndarray, size: int) -> dict:
    """`{"d2t": int32 [size], "head": [size, E]}`: the `size` first tokens of `ranking` (sorted by id, so the
    draft's top-k ties break as on the full vocabulary) and their LM-head rows."""
    check_size(size, cfg)
    d2t = np.sort(np.asarray(ranking_V[:size], np.int32))
    d2t_dev = jnp.asarray(d2t)
    return {"d2t": d2t_dev, "head": lm_head_rows(target_params, cfg, d2t_dev)}


def vocab_logits(vocab: dict, normed_BxE: jax.Array) -> jax.Array:
    """Float32 logits [..., Vd] over the reduced vocabulary from final-normed states [..., E]."""
    head = vocab["head"].astype(normed_BxE.dtype)
    return jax.lax.dot_general(normed_BxE, head, (((normed_BxE.ndim - 1,), (1,)), ((), ()))).astype(jnp.float32)


def full_vocab_logits(vocab: dict, logits_xVd: jax.Array, vocab_size: int) -> jax.Array:
    """Reduced-vocabulary logits [..., Vd] spread over the full vocabulary [..., V]; every other token gets the
    lowest float32 logit (probability 0 after softmax, never in a top-k), so drafting never picks one."""
    full = jnp.full((*logits_xVd.shape[:-1], vocab_size), jnp.finfo(jnp.float32).min, jnp.float32)
    return full.at[..., vocab["d2t"]].set(logits_xVd)


def to_target_ids(vocab: dict | None, ids: jax.Array) -> jax.Array:
    """Draft-vocabulary indices -> target token ids (the identity for the full vocabulary)."""
    return ids if vocab is None else jnp.take(vocab["d2t"], ids, axis=0)


# ----------------------------------------------------------------------------- the `--draft-vocab` option

VOCAB_OPTION = Option(
    "draft_vocab", int, 0, "reduced draft vocabulary: the heads read out only the N most frequent tokens of their "
    "training data (FR-Spec; token_ranking.npy of the heads); verification keeps the full vocabulary, so decoding "
    "stays lossless. 0: the full vocabulary", min=0)


def check_option(size: int, cfg: Config, heads: Path | None, min_size: int = 1) -> None:
    """`--draft-vocab` against the model and the heads (before any weights load): it needs trained heads with
    a token ranking, and at least `min_size` tokens (the tree's widest top-k)."""
    if not size:
        return
    check_size(size, cfg)
    if heads is None:
        raise InvalidArgumentError("--draft-vocab needs trained heads (--heads, or heads shipped for this model): "
                                   "the reduced vocabulary is their training data's most frequent tokens")
    if not (Path(heads) / RANKING_FILE).is_file():
        load_ranking(heads, cfg)  # the error that names the missing file
    if size < min_size:
        raise InvalidArgumentError(f"--draft-vocab {size}: the tree takes the top {min_size} draft tokens per node; "
                                   f"give at least {min_size}")


def with_vocab(weights: dict, size: int, target, heads: Path | None) -> dict:
    """The drafter's weights with `"vocab"` added when `--draft-vocab` asks for a reduced vocabulary."""
    if not size:
        return weights
    vocab = reduced_vocab(target.params, target.cfg, load_ranking(heads, target.cfg), size)
    if target.mesh is not None:
        from spec_jax.sharding import replicated, to_global

        vocab = jax.tree.map(lambda x: to_global(np.asarray(x), replicated(target.mesh)), vocab)
    return {**weights, "vocab": vocab}


def check_weights(vocab, cfg: Config, top: int, method: str) -> None:
    """A drafter's `weights["vocab"]` (or None) is a reduced vocabulary of this model holding >= `top` tokens."""
    if vocab is None:
        return
    if not isinstance(vocab, dict) or set(vocab) != {"d2t", "head"}:
        raise TypeError(f"{method}: weights['vocab'] must be {{'d2t', 'head'}} (vocab.reduced_vocab)")
    (n,), shape = np.shape(vocab["d2t"]), tuple(np.shape(vocab["head"]))
    if shape != (n, cfg.hidden_size) or not top <= n <= cfg.vocab_size:
        raise InvalidArgumentError(f"{method}: a reduced vocabulary of {n} tokens with a head of shape {shape} does "
                                   f"not fit this model (hidden size {cfg.hidden_size}, vocabulary {cfg.vocab_size}) "
                                   f"and a tree taking the top {top}")
