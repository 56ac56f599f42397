"""`pld`: prompt lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`).

The last n tokens (the pending token included) are looked up in the prompt and the text generated
so far; the tokens that followed the most recent earlier occurrence are the draft chain. n runs
from `max_ngram` down to `min_ngram` and the longest n with a match wins. Drafts are
deterministic (point-mass rule under sampling). Everything is array code over the token buffer,
so it runs inside the jitted step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spec_jax.drafters.base import StepContext, TemplateDrafter
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.errors import InvalidArgumentError
from spec_jax.trees import TreeTemplate


def lookup(tokens_BxS: jax.Array, last_B: jax.Array, n: int, k: int):
    """Continuation of the most recent earlier occurrence of tokens[last-n+1 .. last].

    Returns (draft tokens [B, k], valid [B, k]); a draft token is valid when a match exists and the
    token lies at or before `last` (already known).
    """
    B, S = tokens_BxS.shape
    suffix = jnp.take_along_axis(tokens_BxS, last_B[:, None] - n + 1 + jnp.arange(n)[None], axis=1)  # [B, n]
    starts = jnp.arange(S - n + 1)
    match = jnp.ones((B, S - n + 1), bool)
    for j in range(n):
        match &= tokens_BxS[:, j: S - n + 1 + j] == suffix[:, j: j + 1]
    # An earlier occurrence: it ends before `last`, and the suffix itself is inside the sequence.
    match &= (starts[None] + n - 1 < last_B[:, None]) & (last_B[:, None] - n + 1 >= 0)
    found = jnp.any(match, axis=1)
    start = jnp.max(jnp.where(match, starts[None], -1), axis=1)
    pos = start[:, None] + n + jnp.arange(k)[None]  # [B, k]
    draft = jnp.take_along_axis(tokens_BxS, jnp.clip(pos, 0, S - 1), axis=1)
    return draft, found[:, None] & (pos <= last_B[:, None])


@dataclasses.dataclass(frozen=True)
class PromptLookup(TemplateDrafter):
    k: int = 5  # draft tokens
    max_ngram: int = 3
    min_ngram: int = 1
    name = "pld"

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram or self.k < 1:
            raise InvalidArgumentError(
                f"prompt lookup needs k >= 1 and 1 <= min_ngram <= max_ngram, got k={self.k}, "
                f"ngrams {self.min_ngram}..{self.max_ngram}")

    @property
    def template(self) -> TreeTemplate:
        return TreeTemplate.chain(self.k)

    def propose(self, weights, state, ctx: StepContext):
        draft_BxK, valid_BxK = lookup(ctx.tokens_BxS, ctx.committed_B, self.max_ngram, self.k)
        for n in range(self.max_ngram - 1, self.min_ngram - 1, -1):  # fall back to shorter n-grams
            d_BxK, v_BxK = lookup(ctx.tokens_BxS, ctx.committed_B, n, self.k)
            use_Bx1 = ~valid_BxK[:, :1]
            draft_BxK, valid_BxK = jnp.where(use_Bx1, d_BxK, draft_BxK), jnp.where(use_Bx1, v_BxK, valid_BxK)
        # A chain node is only useful if all nodes before it are.
        valid_BxK = jnp.cumprod(valid_BxK, axis=1).astype(bool)
        return self.template.build(draft_BxK, valid_BxN=valid_BxK), state, ctx.cache


def _check(opts, cfg) -> None:
    if opts.ngram_min > opts.ngram_max:
        raise InvalidArgumentError(f"--ngram-min {opts.ngram_min} > --ngram-max {opts.ngram_max}: the shortest "
                                   "n-gram cannot be longer than the longest")


@register("pld", "prompt lookup: draft what followed the latest earlier occurrence of the last n tokens",
          options=(Option("draft_k", int, 5, "maximum draft length", min=1),
                   Option("ngram_max", int, 3, "longest n-gram looked up", min=1),
                   Option("ngram_min", int, 1, "shortest n-gram looked up", min=1)),
          check=_check)
def build(opts, target) -> Built:
    return Built(PromptLookup(k=opts.draft_k, max_ngram=opts.ngram_max, min_ngram=opts.ngram_min))
