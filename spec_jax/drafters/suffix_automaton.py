"""`sam` and `sam_tr`: SAM decoding (Hu et al. 2024, "SAM Decoding: Speculative Decoding via Suffix
Automaton").

A suffix automaton over the prompt and the generated text (and optionally over a static corpus) finds
the longest suffix of the current text that occurred before; the tokens that followed its first
occurrence are the draft. The automaton grows by one state (plus at most one clone) per token,
amortised O(1) (Blumer et al. 1985), and the match is advanced incrementally, so a step costs
O(tokens committed) on the host, whatever the context length.

The automaton is a host data structure: the drafter calls it from inside the jitted step with
`jax.experimental.io_callback`, passing the token buffer and lengths, and gets the draft back. The
host time is measured inside the callback and reported apart (`Drafter.host_seconds`). The host side
keeps, per sequence, the automaton of the text it has ingested and checks that text against the
buffer on each call, so a new request (or a different batch) rebuilds it: correctness never depends
on call order.

`sam` drafts a chain. `sam_tr` is Token Recycling's tree whose rank-0 path carries the retrieved
continuation when the match is at least `min_match` tokens long (the recycled successors of those
tokens hang below them), and plain Token Recycling otherwise: the paper's "SAM-Decoding[Token
Recycling]", with the static tree shape a jitted step needs. A match in the static corpus counts
`corpus_bias` tokens shorter than the same match in the request's own text, as in the paper.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from spec_jax.checks import read_utf8, token_ids_in_range
from spec_jax.drafters.base import StepContext, TemplateDrafter, load_int_array
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
    """One sequence's automaton and its incremental longest match."""

    def __init__(self):
        self.sam = SuffixAutomaton()
        self.seen = np.zeros((0,), np.int32)  # the ingested text as an array, to check the buffer against
        self.state = self.matched = 0  # match in the sequence's own (earlier) text
        self.cstate = self.cmatched = 0  # match in the static corpus


class SAMHost:
    """Host side of the suffix-automaton drafters: per-sequence automata, a shared static corpus
    automaton, and the time spent here. Compared by identity, so each drafter traces its own."""

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

    def draft(self, tokens_BxS, lengths_B, k: int, corpus_bias: int):
        """(draft [B, k], valid [B, k], match length [B]) for the texts tokens[b, :lengths[b] + 1]."""
        t0 = time.perf_counter()
        tokens, lengths = np.asarray(tokens_BxS), np.asarray(lengths_B)
        B = tokens.shape[0]
        if len(self.rows) != B:
            self.rows = [_Sequence() for _ in range(B)]
        draft = np.zeros((B, k), np.int32)
        valid = np.zeros((B, k), bool)
        match = np.zeros((B,), np.int32)
        for b in range(B):
            row, n = self.rows[b], int(lengths[b]) + 1
            fed = len(row.seen)
            if fed > n or not np.array_equal(tokens[b, :fed], row.seen):
                row = self.rows[b] = _Sequence()  # a new request in this slot
                fed = 0
            sam, corpus = row.sam, self.corpus
            for t in tokens[b, fed:n].tolist():
                row.state, row.matched = sam.advance(row.state, row.matched, t)  # match before adding t
                sam.extend(t)
                row.state = sam.settle(row.state, row.matched)
                if corpus is not None:
                    row.cstate, row.cmatched = corpus.advance(row.cstate, row.cmatched, t)
            if n > fed:
                row.seen = tokens[b, :n].copy()
            if corpus is not None and row.cmatched - corpus_bias > row.matched:
                cont, m = corpus.continuation(row.cstate, k), row.cmatched
            else:
                cont, m = sam.continuation(row.state, k, wrap=True), row.matched
            draft[b, : len(cont)] = cont
            valid[b, : len(cont)] = True
            match[b] = m
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return draft, valid, match


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


def _host_draft(host: SAMHost, ctx: StepContext, k: int, corpus_bias: int):
    """(draft [B, k], valid [B, k], match length [B]) from the host automata."""
    B = ctx.pending_B.shape[0]
    shapes = (jax.ShapeDtypeStruct((B, k), jnp.int32), jax.ShapeDtypeStruct((B, k), jnp.bool_),
              jax.ShapeDtypeStruct((B,), jnp.int32))
    return io_callback(lambda t, n: host.draft(t, n, k, corpus_bias), shapes, ctx.tokens_BxS, ctx.committed_B,
                       ordered=False)  # steps are ordered by their data dependence


@dataclasses.dataclass(frozen=True)
class SuffixAutomatonDrafter(TemplateDrafter):
    """`sam`: a chain of k tokens continuing the longest earlier match (in the text, or the corpus)."""

    k: int = 6
    min_match: int = 1  # shortest match that drafts
    corpus_bias: int = 4
    host_state: SAMHost = dataclasses.field(default_factory=SAMHost)
    name = "sam"
    host = True

    def __post_init__(self):
        if self.k < 1 or self.min_match < 1:
            raise InvalidArgumentError(f"sam needs k >= 1 and min_match >= 1, got k={self.k}, "
                                       f"min_match={self.min_match}")

    @property
    def template(self) -> TreeTemplate:
        return TreeTemplate.chain(self.k)

    def host_seconds(self) -> float:
        return self.host_state.seconds

    def propose(self, weights, state, ctx: StepContext):
        draft_BxK, valid_BxK, match_B = _host_draft(self.host_state, ctx, self.k, self.corpus_bias)
        valid_BxK &= (match_B >= self.min_match)[:, None]
        return self.template.build(draft_BxK, valid_BxN=valid_BxK), state, ctx.cache


@dataclasses.dataclass(frozen=True)
class SAMTokenRecycling(TokenRecycling):
    """`sam_tr`: Token Recycling's tree, its rank-0 path taken from the suffix automaton on long matches."""

    sam_k: int = 8  # the rank-0 path is extended to this depth so a long match can be drafted whole
    min_match: int = 4
    corpus_bias: int = 4
    host_state: SAMHost = dataclasses.field(default_factory=SAMHost)
    name = "sam_tr"
    host = True

    def __post_init__(self):
        super().__post_init__()
        if self.sam_k < 1 or self.min_match < 1:
            raise InvalidArgumentError(f"sam_tr needs sam_k >= 1 and min_match >= 1, got {self.sam_k}, "
                                       f"{self.min_match}")

    @property
    def template(self) -> TreeTemplate:
        if self.paths is not None:  # an explicit (e.g. budget-pruned) template is taken as it is
            return TreeTemplate(self.paths)
        return TreeTemplate(super().template.paths + TreeTemplate.chain(self.sam_k).paths)

    def host_seconds(self) -> float:
        return self.host_state.seconds

    def propose(self, weights, state, ctx: StepContext):
        tmpl = self.template
        draft_BxK, valid_BxK, match_B = _host_draft(self.host_state, ctx, self.sam_k, self.corpus_bias)
        use_BxK = valid_BxK & (match_B >= self.min_match)[:, None]
        tokens_BxN = fill_template(state["M"], ctx.pending_B, tmpl, draft_BxK, use_BxK)
        return tmpl.build(tokens_BxN, valid_BxN=distinct_siblings(tokens_BxN, tmpl.parents)), state, ctx.cache


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


@register("sam", "SAM decoding: a suffix automaton (host) over the prompt, the output and an optional corpus "
          "drafts the continuation of the longest earlier match",
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
