"""`sam` and `sam_tr`: SAM decoding (Hu et al. 2024, "SAM Decoding: Speculative Decoding via Suffix
Automaton").

The draft continues the longest suffix of the current text (the pending token included) that occurred
before: the tokens that followed its first occurrence. A match that runs into the end of the text goes on
from its own output, LZ77-style, so a text that repeats with period P is drafted as repeating.

The request's own text is matched on device, inside the jitted step, by the array form of the suffix
automaton's incremental match: the drafter state holds, for every earlier end position e, the length of
the common suffix of tokens[:e+1] and the whole text (`match[B, S]`). When r new tokens join the text
(the accepted drafts and the next pending token; r <= depth + 1), match'[e] = match[e-r] + r where the r
tokens ending at e equal the r new ones, else the number of equal tokens counted back from e: one
[B, S, r] comparison a step, O(S r) work, exact at any match length. The longest match is the maximum of
`match`, its first occurrence the first position holding it: the same drafts as the automaton
(`SuffixAutomaton`, checked against it in the tests), with no host round trip.

A static corpus (`--sam-corpus`) lives in a host suffix automaton (`SuffixAutomaton`, Blumer et al.
1985: one state, plus at most one clone, per token; the match advanced incrementally, so a step costs
O(tokens committed) on the host whatever the corpus size). Only with a corpus does the step call the
host, through `jax.pure_callback` with the token buffer and lengths: the host's answer is a function of
those alone (it keeps, per sequence, the corpus match of the text it has seen and checks that text
against the buffer on each call, so a new request restarts it and correctness never depends on call
order), and a pure callback keeps jit's fast C++ dispatch, which an effectful `io_callback` loses (about
3 ms per call of a separately dispatched phase on the 2-core CPU). The host time is measured inside the
callback and reported apart (`Drafter.host_seconds`). A match in the corpus counts `corpus_bias` tokens
shorter than the same match in the request's own text, as in the paper; matches shorter than
`min_match` do not draft.

`sam` drafts a chain. `sam_tr` is Token Recycling's tree whose rank-0 path carries the retrieved
continuation when the match is at least `min_match` tokens long (the recycled successors of those
tokens hang below them), and plain Token Recycling otherwise: the paper's "SAM-Decoding[Token
Recycling]", with the static tree shape a jitted step needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.checks import read_utf8, token_ids_in_range
from spec_jax.drafters.base import PrefillContext, StepContext, StepResult, TemplateDrafter, load_int_array
from spec_jax.drafters.registry import Built, Option, register
from spec_jax.drafters.token_recycling import (
    TR_OPTIONS,
    TokenRecycling,
    check_recycling,
    distinct_siblings,
    fill_template,
    recycling_settings,
)
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.trees import TreeTemplate


class SuffixAutomaton:
    """Incremental suffix automaton of a token sequence (host side, pure Python).

    State s: `next[s]` transitions, `link[s]` suffix link, `length[s]` its longest string,
    `first_end[s]` the end position of the first occurrence of its strings. State 0 is the root.
    """

    __slots__ = ("next", "link", "length", "first_end", "text", "last")

    def __init__(self, tokens=()):
        self.next: list[dict[int, int]] = [{}]
        self.link = [-1]
        self.length = [0]
        self.first_end = [-1]
        self.text: list[int] = []
        self.last = 0
        for t in tokens:
            self.extend(int(t))

    def extend(self, token: int) -> None:
        """Append one token (Blumer et al.'s online construction)."""
        nxt, link, length = self.next, self.link, self.length
        cur = len(nxt)
        nxt.append({})
        link.append(0)
        length.append(length[self.last] + 1)
        self.first_end.append(len(self.text))
        self.text.append(token)
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(nxt)
                nxt.append(dict(nxt[q]))
                link.append(link[q])
                length.append(length[p] + 1)
                self.first_end.append(self.first_end[q])
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur

    def advance(self, state: int, matched: int, token: int) -> tuple[int, int]:
        """The longest match after `token` is appended to a text whose longest match was (state, matched)."""
        while state and token not in self.next[state]:
            state = self.link[state]
            matched = self.length[state]
        if token in self.next[state]:
            return self.next[state][token], matched + 1
        return 0, 0

    def settle(self, state: int, matched: int) -> int:
        """The state holding a match of length `matched` after later `extend`s may have split `state`."""
        while state and self.length[self.link[state]] >= matched:
            state = self.link[state]
        return state

    def continuation(self, state: int, k: int, wrap: bool = False) -> list[int]:
        """Up to k tokens following the first occurrence of the state's strings. With `wrap` (the
        automaton is of the text being continued), a copy that reaches the end of the text goes on
        from its own output, LZ77-style: a text that repeats with period P is drafted as repeating."""
        if state == 0:
            return []
        start = self.first_end[state] + 1
        out = self.text[start: start + k]
        period = len(self.text) - start
        while wrap and len(out) < k:
            out.append(out[-period])
        return out


def longest_earlier_match(text: list[int], i: int) -> tuple[int, int]:
    """Brute force (for tests): the longest suffix of text[:i+1] that also ends before i, and the end of
    its first occurrence (-1 when none)."""
    best = (0, -1)
    for n in range(1, i + 1):
        suffix = text[i - n + 1: i + 1]
        ends = [e for e in range(n - 1, i) if text[e - n + 1: e + 1] == suffix]
        if not ends:
            break
        best = (n, ends[0])
    return best


class _Sequence:
    """One sequence's corpus match and the text it has been advanced through."""

    def __init__(self):
        self.seen = np.zeros((0,), np.int32)  # the ingested text, to check the buffer against
        self.state = self.matched = 0  # longest match of the text's suffix in the corpus


class SAMHost:
    """Host side of the suffix-automaton drafters: the static corpus automaton (None: no host side), each
    sequence's match in it, and the time spent here. Compared by identity, so each drafter traces its own."""

    def __init__(self, corpus: SuffixAutomaton | None = None):
        self.corpus = corpus
        self.rows: list[_Sequence] = []
        self.seconds = 0.0
        self.calls = 0

    def fingerprint(self) -> str:
        """The static corpus, hashed (what the host side brings to the drafts besides the request itself): keys
        what is cached about the drafter's acceptance (`--budget auto`)."""
        if self.corpus is None:
            return "no corpus"
        return hashlib.sha256(np.asarray(self.corpus.text, np.int64).tobytes()).hexdigest()

    def draft(self, tokens_BxS, lengths_B, k: int):
        """(draft [B, k], valid [B, k], match length [B]) from the corpus for the texts tokens[b, :lengths[b] + 1]."""
        t0 = time.perf_counter()
        tokens, lengths = np.asarray(tokens_BxS), np.asarray(lengths_B)
        B = tokens.shape[0]
        if len(self.rows) != B:
            self.rows = [_Sequence() for _ in range(B)]
        draft = np.zeros((B, k), np.int32)
        valid = np.zeros((B, k), bool)
        match = np.zeros((B,), np.int32)
        corpus = self.corpus
        for b in range(B):
            row, n = self.rows[b], int(lengths[b]) + 1
            fed = len(row.seen)
            if fed > n or not np.array_equal(tokens[b, :fed], row.seen):
                row = self.rows[b] = _Sequence()  # a new request in this slot
                fed = 0
            for t in tokens[b, fed:n].tolist():
                row.state, row.matched = corpus.advance(row.state, row.matched, t)
            if n > fed:
                row.seen = tokens[b, :n].copy()
            cont = corpus.continuation(row.state, k)
            draft[b, : len(cont)] = cont
            valid[b, : len(cont)] = True
            match[b] = row.matched
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return draft, valid, match


# ----------------------------------------------------------------------------- the request's own text, on device

def ingest(match_BxS: jax.Array, tokens_BxS: jax.Array, end_B: jax.Array, count_B: jax.Array,
           width: int) -> jax.Array:
    """The match array once the `count_B` (<= width) tokens after position `end_B` have joined the text.

    match[b, e], for e < end[b], is the length of the common suffix of tokens[b, :e+1] and tokens[b, :end[b]+1]
    (0 for e >= end): how long a suffix of the text also ends at e. Adding r tokens, a position keeps its run
    r tokens back plus r if the r tokens ending at it equal the new ones, else it counts its equal tokens
    back from the new end (the automaton's `advance`, for every position at once).
    """
    B, S = tokens_BxS.shape
    new_end_B = end_B + count_B
    e_S, j_W = jnp.arange(S), jnp.arange(width)
    back_BxSxW = jnp.stack([jnp.pad(tokens_BxS, ((0, 0), (j, 0)), constant_values=-1)[:, :S]  # tokens[e - j]
                            for j in range(width)], axis=2)
    new_BxW = jnp.take_along_axis(tokens_BxS, jnp.clip(new_end_B[:, None] - j_W, 0, S - 1), axis=1)
    compared_BxW = j_W[None] < count_B[:, None]
    same_BxSxW = (back_BxSxW == new_BxW[:, None]) | ~compared_BxW[:, None]
    run_BxSxW = jnp.cumsum(~same_BxSxW, axis=2) == 0  # equal so far, counting back from the new end
    lead_BxS = jnp.sum(run_BxSxW & compared_BxW[:, None], axis=2)
    shifted_BxS = jnp.take_along_axis(match_BxS, jnp.clip(e_S[None] - count_B[:, None], 0, S - 1), axis=1)
    shifted_BxS = jnp.where(e_S[None] >= count_B[:, None], shifted_BxS, 0)
    out_BxS = jnp.where(run_BxSxW[:, :, -1], shifted_BxS + count_B[:, None], lead_BxS)
    return jnp.where(e_S[None] < new_end_B[:, None], out_BxS, 0).astype(jnp.int32)


def ingest_prompt(tokens_BxS: jax.Array, prompt_lens_B: jax.Array, width: int = 16) -> jax.Array:
    """The match array of each prompt followed by its first generated token, `width` tokens at a time."""
    total_B = prompt_lens_B + 1

    def body(carry):
        match_BxS, fed_B = carry
        n_B = jnp.minimum(total_B - fed_B, width)
        return ingest(match_BxS, tokens_BxS, fed_B - 1, n_B, width), fed_B + n_B

    zeros_BxS = jnp.zeros(tokens_BxS.shape, jnp.int32)
    return jax.lax.while_loop(lambda c: jnp.any(c[1] < total_B), body, (zeros_BxS, jnp.zeros_like(total_B)))[0]


def own_draft(match_BxS: jax.Array, tokens_BxS: jax.Array, end_B: jax.Array, k: int):
    """(draft [B, k], match length [B]): the continuation of the first occurrence of the longest earlier match,
    run on from its own output when it reaches the end of the text (`SuffixAutomaton.continuation`, wrap)."""
    S = tokens_BxS.shape[1]
    match_B = jnp.max(match_BxS, axis=1)
    first_end_B = jnp.argmax(match_BxS == match_B[:, None], axis=1)  # the earliest end holding the longest match
    start_B = first_end_B + 1
    period_B = jnp.maximum(end_B + 1 - start_B, 1)
    pos_BxK = start_B[:, None] + jnp.arange(k)[None] % period_B[:, None]
    return jnp.take_along_axis(tokens_BxS, jnp.clip(pos_BxK, 0, S - 1), axis=1), match_B


def _draft(host: SAMHost, match_BxS: jax.Array, ctx: StepContext, k: int, corpus_bias: int):
    """(draft [B, k], valid [B, k], match length [B]): the longest earlier match in the text, or in the corpus
    when that one is longer by more than `corpus_bias`."""
    draft_BxK, match_B = own_draft(match_BxS, ctx.tokens_BxS, ctx.committed_B, k)
    valid_BxK = jnp.broadcast_to((match_B > 0)[:, None], draft_BxK.shape)
    if host.corpus is None:
        return draft_BxK, valid_BxK, match_B
    B = ctx.pending_B.shape[0]
    shapes = (jax.ShapeDtypeStruct((B, k), jnp.int32), jax.ShapeDtypeStruct((B, k), jnp.bool_),
              jax.ShapeDtypeStruct((B,), jnp.int32))
    # A function of its inputs alone (see the module docstring), so a pure callback: jit keeps its fast dispatch.
    c_draft_BxK, c_valid_BxK, c_match_B = jax.pure_callback(lambda t, n: host.draft(t, n, k), shapes,
                                                            ctx.tokens_BxS, ctx.committed_B)
    corpus_B = c_match_B - corpus_bias > match_B  # the paper's bias towards the request's own text
    pick = lambda c, o: jnp.where(corpus_B.reshape((B,) + (1,) * (c.ndim - 1)), c, o)
    return pick(c_draft_BxK, draft_BxK), pick(c_valid_BxK, valid_BxK), pick(c_match_B, match_B)


def _observed(match_BxS: jax.Array, result: StepResult, width: int) -> jax.Array:
    """The match array after a step: the accepted drafts and the next pending token joined the text."""
    count_B = result.committed_after_B - result.committed_before_B  # 0 for finished sequences
    return ingest(match_BxS, result.tokens_BxS, result.committed_before_B, count_B, width)


def read_corpus(path: str | Path, vocab_size: int, tokenizer=None) -> list[int] | None:
    """A corpus file's token ids: a .npy of 1-D integers within [0, vocab_size), or UTF-8 text
    (tokenized when `tokenizer` is given, else only checked and None returned)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"corpus file {path} not found")
    if path.suffix == ".npy":
        ids = load_int_array(path, 1, ".npy array of token ids")
        token_ids_in_range(ids, vocab_size, str(path), "; the corpus was tokenized for another model")
        return ids.tolist()
    text = read_utf8(path, "the corpus")
    return tokenizer(text).input_ids if tokenizer is not None else None


def load_corpus(path: str | Path, vocab_size: int, tokenizer=None) -> SuffixAutomaton:
    """A static corpus automaton from token ids (.npy, 1-D integers) or text (.txt, needs a tokenizer)."""
    ids = read_corpus(path, vocab_size, tokenizer)
    if ids is None:
        raise InvalidArgumentError(f"{path}: a text corpus needs the model's tokenizer")
    return SuffixAutomaton(ids)


@dataclasses.dataclass(frozen=True)
class SuffixAutomatonDrafter(TemplateDrafter):
    """`sam`: a chain of k tokens continuing the longest earlier match (in the text, or the corpus)."""

    k: int = 6
    min_match: int = 1  # shortest match that drafts
    corpus_bias: int = 4
    host_state: SAMHost = dataclasses.field(default_factory=SAMHost)
    name = "sam"

    def __post_init__(self):
        if self.k < 1 or self.min_match < 1:
            raise InvalidArgumentError(f"sam needs k >= 1 and min_match >= 1, got k={self.k}, "
                                       f"min_match={self.min_match}")

    @property
    def host(self) -> bool:
        """Only a static corpus is matched on the host."""
        return self.host_state.corpus is not None

    @property
    def template(self) -> TreeTemplate:
        return TreeTemplate.chain(self.k)

    def host_seconds(self) -> float:
        return self.host_state.seconds

    def init(self, weights, carry, cfg, batch: int, cache_size: int):
        return {"match": jnp.zeros((batch, cache_size), jnp.int32)}

    def prefill(self, weights, state, ctx: PrefillContext):
        return {**state, "match": ingest_prompt(ctx.tokens_BxS, ctx.prompt_lens_B)}

    def propose(self, weights, state, ctx: StepContext):
        draft_BxK, valid_BxK, match_B = _draft(self.host_state, state["match"], ctx, self.k, self.corpus_bias)
        valid_BxK &= (match_B >= self.min_match)[:, None]
        return self.template.build(draft_BxK, valid_BxN=valid_BxK), state, ctx.cache

    def observe(self, weights, state, result: StepResult):
        return {**state, "match": _observed(state["match"], result, self.shape.depth + 1)}


@dataclasses.dataclass(frozen=True)
class SAMTokenRecycling(TokenRecycling):
    """`sam_tr`: Token Recycling's tree, its rank-0 path taken from the longest earlier match when it is long."""

    sam_k: int = 8  # the rank-0 path is extended to this depth so a long match can be drafted whole
    min_match: int = 4
    corpus_bias: int = 4
    host_state: SAMHost = dataclasses.field(default_factory=SAMHost)
    name = "sam_tr"

    def __post_init__(self):
        super().__post_init__()
        if self.sam_k < 1 or self.min_match < 1:
            raise InvalidArgumentError(f"sam_tr needs sam_k >= 1 and min_match >= 1, got {self.sam_k}, "
                                       f"{self.min_match}")

    @property
    def host(self) -> bool:
        """Only a static corpus is matched on the host."""
        return self.host_state.corpus is not None

    @property
    def template(self) -> TreeTemplate:
        if self.paths is not None:  # an explicit (e.g. budget-pruned) template is taken as it is
            return TreeTemplate(self.paths)
        return TreeTemplate(super().template.paths + TreeTemplate.chain(self.sam_k).paths)

    def host_seconds(self) -> float:
        return self.host_state.seconds

    def init(self, weights, carry, cfg, batch: int, cache_size: int):
        return {**super().init(weights, carry, cfg, batch, cache_size),
                "match": jnp.zeros((batch, cache_size), jnp.int32)}

    def prefill(self, weights, state, ctx: PrefillContext):
        return {**state, "match": ingest_prompt(ctx.tokens_BxS, ctx.prompt_lens_B)}

    def propose(self, weights, state, ctx: StepContext):
        tmpl = self.template
        draft_BxK, valid_BxK, match_B = _draft(self.host_state, state["match"], ctx, self.sam_k, self.corpus_bias)
        use_BxK = valid_BxK & (match_B >= self.min_match)[:, None]
        tokens_BxN = fill_template(state["M"], ctx.pending_B, tmpl, draft_BxK, use_BxK)
        return tmpl.build(tokens_BxN, valid_BxN=distinct_siblings(tokens_BxN, tmpl.parents)), state, ctx.cache

    def observe(self, weights, state, result: StepResult):
        state = super().observe(weights, state, result)
        return {**state, "match": _observed(state["match"], result, self.shape.depth + 1)}


SAM_CORPUS = Option("sam_corpus", str, None, "static corpus to retrieve from too: token ids (.npy) or text (.txt)",
                    path="read")


def _host(opts, target) -> SAMHost:
    return SAMHost(load_corpus(opts.sam_corpus, target.cfg.vocab_size, target.tokenizer) if opts.sam_corpus
                   else None)


def _check_corpus(opts, cfg) -> None:
    if opts.sam_corpus:
        read_corpus(opts.sam_corpus, cfg.vocab_size)


def _check_sam_tr(opts, cfg) -> None:
    _check_corpus(opts, cfg)
    check_recycling(opts, cfg)


@register("sam", "SAM decoding: the continuation of the longest earlier match in the prompt and output (on "
          "device) or an optional static corpus (a host suffix automaton)",
          options=(Option("draft_k", int, 6, "maximum draft length", min=1),
                   Option("sam_min_match", int, 1, "shortest match that drafts", min=1), SAM_CORPUS),
          check=_check_corpus)
def build_sam(opts, target) -> Built:
    return Built(SuffixAutomatonDrafter(k=opts.draft_k, min_match=opts.sam_min_match, host_state=_host(opts, target)))


@register("sam_tr", "SAM decoding on Token Recycling's tree: long matches on its top path, recycled "
          "successors elsewhere",
          options=(Option("draft_k", int, 8, "depth of the retrieval path", min=1),
                   Option("sam_min_match", int, 4, "shortest match that drafts (below it: Token Recycling alone)",
                          min=1),
                   SAM_CORPUS, *TR_OPTIONS), check=_check_sam_tr, prunable=True)
def build_sam_tr(opts, target) -> Built:
    levels, matrix, save = recycling_settings(opts, target.cfg)
    drafter = SAMTokenRecycling(k=opts.tr_k, levels=levels, sam_k=opts.draft_k, min_match=opts.sam_min_match,
                                host_state=_host(opts, target))
    return Built(drafter, carry=matrix, save=save)
