"""Training-free drafters: Token Recycling, prompt lookup, Lookahead and the suffix-automaton drafters
are exact under greedy decoding, and their data structures do what the papers say."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_jax.decoding import Engine, generate
from spec_jax.drafters.lookahead import Lookahead, candidate_trie
from spec_jax.drafters.prompt_lookup import PromptLookup, lookup
from spec_jax.drafters.suffix_automaton import (
    SAMTokenRecycling,
    SuffixAutomaton,
    SuffixAutomatonDrafter,
    ingest,
    ingest_prompt,
    load_corpus,
    longest_earlier_match,
    own_draft,
)
from spec_jax.drafters.token_recycling import (
    TokenRecycling,
    distinct_siblings,
    load_matrix,
    save_matrix,
    update_matrix,
)
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.trees import TreeTemplate

DRAFTERS = [
    TokenRecycling(k=4, levels=(4, 6, 4, 2)),
    TokenRecycling(k=2, levels=(2,)),
    PromptLookup(k=4, max_ngram=3, min_ngram=1),
    PromptLookup(k=2, max_ngram=2, min_ngram=2),
    Lookahead(window=4, ngram=4, candidates=4),
    Lookahead(window=3, ngram=2, candidates=2, seed_from_prompt=False),
    SuffixAutomatonDrafter(k=5),
    SAMTokenRecycling(k=4, levels=(4, 6, 4, 2), sam_k=6, min_match=2),
]


def _repetitive_prompts():
    """Prompts with repeated phrases, so lookups and recycled successors have something to find."""
    rng = np.random.default_rng(1)
    phrase = rng.integers(3, 256, size=6).tolist()
    return [phrase * 3 + [7, 8], rng.integers(3, 256, size=9).tolist(), phrase + [1] + phrase[:3]]


@pytest.mark.parametrize("drafter", DRAFTERS, ids=lambda d: f"{d.name}-{d.shape.nodes}")
def test_greedy_exact_batched_and_single(drafter, tiny):
    params, cfg = tiny
    prompts = _repetitive_prompts()
    ar = generate(Engine(cfg), params, prompts, 40).token_ids
    g = generate(Engine(cfg, drafter), params, prompts, 40)
    assert g.token_ids == ar
    for i, p in enumerate(prompts):
        assert generate(Engine(cfg, drafter), params, [p], 40).token_ids[0] == ar[i]
    # Greedy tiny models fall into loops, which both drafters must exploit.
    assert g.tau > 1.3, g.tau


def test_token_recycling_hot_start_and_sampling(tiny):
    """The matrix learned on one request carries to the next; a sampled run with the warm matrix
    (point-mass verification, whose law is tested in test_lossless_sampling) accepts drafts."""
    from spec_jax.sampling import Sampling

    params, cfg = tiny
    prompts = _repetitive_prompts()
    tr = TokenRecycling(k=4, levels=(4, 6, 4))
    cold = generate(Engine(cfg, tr), params, prompts, 40)
    assert cold.carry.shape == (cfg.vocab_size, 4) and int(jnp.sum(cold.carry != 0)) > 0
    warm = generate(Engine(cfg, tr), params, prompts, 40, carry=cold.carry)
    assert warm.token_ids == cold.token_ids and warm.tau >= cold.tau
    s = generate(Engine(cfg, tr, Sampling(0.7)), params, prompts, 40, carry=warm.carry, seed=3)
    assert s.tau > 1.0


def test_matrix_update_hand_built():
    M = jnp.zeros((10, 2), jnp.int32)
    fed = jnp.array([[3, 5, 3], [5, 9, 1]])
    top = jnp.arange(2 * 3 * 2, dtype=jnp.int32).reshape(2, 3, 2) + 100
    valid = jnp.array([[True, True, True], [True, True, False]])
    out = np.asarray(update_matrix(M, fed, top, valid))
    np.testing.assert_array_equal(out[3], [104, 105])  # token 3 twice in sequence 0: the later slot wins
    np.testing.assert_array_equal(out[5], [106, 107])  # token 5 in both sequences: the later sequence wins
    np.testing.assert_array_equal(out[9], [108, 109])
    np.testing.assert_array_equal(out[1], [0, 0])  # an invalid slot writes nothing
    assert out[[0, 2, 4, 6, 7, 8]].sum() == 0


@pytest.mark.parametrize("k,block", [(8, 16), (3, 7), (8, 64), (4, 500)])
def test_blockwise_top_k_equals_lax_top_k(k, block):
    """Token Recycling's matrix update takes the top-k of every fed slot's logits through `sampling.top_k`:
    the same values and indices as `lax.top_k`, ties (to the lower index) and -inf included."""
    from spec_jax.sampling import argmax, top_k

    rng = np.random.default_rng(k + block)
    x = rng.normal(size=(2, 6, 1000)).astype(np.float32)
    x[0] = rng.integers(0, 4, size=(6, 1000))  # many ties, across blocks
    x[1, 0, :] = -np.inf
    x[1, 1, 2:] = -np.inf  # fewer finite entries than k
    for a in (x, x[..., :997]):  # a last block cut short, padded
        want_v, want_i = jax.lax.top_k(jnp.asarray(a), k)
        got_v, got_i = jax.jit(top_k, static_argnums=(1, 2))(jnp.asarray(a), k, block)
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_tree_from_known_matrix():
    tr = TokenRecycling(k=3, levels=(3, 2, 1))
    V = 20
    M = (jnp.arange(V)[:, None] * 3 + jnp.arange(3)[None] + 1) % V  # M[t, r] = 3t + r + 1 (mod V)
    from spec_jax.drafters.base import StepContext

    ctx = StepContext(None, None, None, None, None, jnp.array([2]), None, None)
    tree, _, _ = tr.propose(None, {"M": M.astype(jnp.int32)}, ctx)
    tmpl = tr.template
    for i, path in enumerate(tmpl.paths):
        t = 2
        for r in path:
            t = int(M[t, r])
        assert int(tree.tokens[0, i]) == t, (path, i)
    assert bool(jnp.all(tree.valid))


def test_duplicate_siblings_invalid():
    parents = TreeTemplate.kary((3, 2)).parents
    tokens = jnp.array([[5, 5, 6, 1, 2, 3, 3, 4, 4]])  # node 1 duplicates node 0; 3/3 and 4/4 siblings dup
    valid = np.asarray(distinct_siblings(tokens, parents))[0]
    # nodes: 0,1,2 at depth 1; children of 0: 3,4; of 1: 5,6; of 2: 7,8.
    assert valid.tolist() == [True, False, True, True, True, False, False, True, False]


def test_matrix_file_round_trip_and_errors(tmp_path, tiny):
    params, cfg = tiny
    M = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(cfg.vocab_size, 4)).astype(np.int32)
    path = save_matrix(M, tmp_path / "tr.npy")
    np.testing.assert_array_equal(load_matrix(path, cfg.vocab_size, 4), M)
    other = save_matrix(M, tmp_path / "tr.bin")  # any name: np.save must not append ".npy" to the temp file
    np.testing.assert_array_equal(load_matrix(other, cfg.vocab_size, 4), M)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tr.bin", "tr.npy"]  # no temporary left behind
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(DataFormatError, match="token recycling matrix"):
        load_matrix(tmp_path / "bad.npy", cfg.vocab_size, 4)
    with pytest.raises(DataFormatError, match="shape"):
        load_matrix(path, cfg.vocab_size, 8)
    for bad in (cfg.vocab_size, -1):
        M2 = M.copy()
        M2[3, 1] = bad
        save_matrix(M2, tmp_path / "oov.npy")
        with pytest.raises(DataFormatError, match=rf"oov.npy: token id {bad} at index \(3, 1\) is outside"):
            load_matrix(tmp_path / "oov.npy", cfg.vocab_size, 4)
    with pytest.raises(InvalidArgumentError, match="shape"):
        generate(Engine(cfg, TokenRecycling(k=8, levels=(2,))), params, [[1, 2]], 4, carry=M)


def _brute_lookup(seq, last, n, k):
    suffix = seq[last - n + 1: last + 1]
    if last - n + 1 < 0:
        return [], []
    for start in range(last - n, -1, -1):
        if seq[start: start + n] == suffix:
            cont = [seq[p] if p <= last else None for p in range(start + n, start + n + k)]
            return cont, [c is not None for c in cont]
    return [], []


def test_lookup_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        seq = rng.integers(0, 4, size=24).tolist()
        last = int(rng.integers(0, 20))
        for n in (1, 2, 3):
            draft, valid = lookup(jnp.asarray([seq]), jnp.asarray([last]), n, 4)
            want, want_valid = _brute_lookup(seq, last, n, 4)
            got_valid = np.asarray(valid[0]).tolist()
            if not want:
                assert not any(got_valid)
            else:
                assert got_valid == want_valid
                assert [int(t) for t, v in zip(draft[0], got_valid, strict=True) if v] == [
                    w for w in want if w is not None]


def test_invalid_settings():
    with pytest.raises(InvalidArgumentError, match="ngram"):
        PromptLookup(min_ngram=3, max_ngram=2)
    with pytest.raises(InvalidArgumentError, match="ngram >= 2"):
        Lookahead(ngram=1)
    with pytest.raises(InvalidArgumentError, match="min_match"):
        SuffixAutomatonDrafter(min_match=0)
    with pytest.raises(InvalidArgumentError, match="levels"):
        TokenRecycling(levels=())


def test_default_tree_and_matrix_size_for_smollm2():
    from spec_jax.models import Config

    tr = TokenRecycling()
    assert tr.shape.nodes == 80 and tr.shape.depth == 6 and tr.template.level_sizes == (8, 21, 25, 15, 8, 3)
    state = jax.eval_shape(lambda: tr.init(None, None, Config(vocab_size=49_152), 1, 128))
    assert state["M"].size * state["M"].dtype.itemsize < 2 * 1024 * 1024  # 1.5 MB


def test_budget_shrinks_when_verification_cost_grows_faster():
    from spec_jax.policies.budget import choose_budget

    rates = 0.9 ** np.arange(1, 41) * 0.8  # acceptance falls off with node rank
    flat = {1: 0.010, 41: 0.010}  # GPU-like: 41 tokens cost as much as one
    mild = {1: 0.010, 41: 0.030}
    steep = {1: 0.010, 41: 0.080}  # CPU-like
    n_flat, _ = choose_budget(rates, flat)
    n_mild, _ = choose_budget(rates, mild)
    n_steep, curve = choose_budget(rates, steep)
    assert n_flat > n_mild > n_steep >= 1
    assert n_flat == 40
    best = max(curve, key=lambda c: c["tokens_per_second"])
    assert best["nodes"] == n_steep


def test_prune_template_keeps_ancestors():
    from spec_jax.policies.budget import prune_template

    tmpl = TreeTemplate.kary((3, 3))
    rates = np.zeros(tmpl.num_nodes)
    rates[tmpl.paths.index((2, 1))] = 0.5  # a deep node with a high rate pulls in its parent
    rates[tmpl.paths.index((0,))] = 0.4
    pruned = prune_template(tmpl, rates, 3)
    assert set(pruned.paths) == {(2,), (2, 1), (0,)}


def test_auto_budget_end_to_end(tiny):
    from spec_jax.decoding.budget import auto_budget

    params, cfg = tiny
    prompts = _repetitive_prompts()
    tr = TokenRecycling(k=4, levels=(4, 6, 4, 2))
    steep = {t: 0.01 * t for t in range(1, 18)}  # every verified token costs a full step: no tree beats AR
    engine_steep, report_steep = auto_budget(Engine(cfg, tr), params, prompts, max_new_tokens=30, cost=steep,
                                             probes=0, use_cache=False)
    assert report_steep["nodes"] == engine_steep.drafter.shape.nodes == 0 and not report_steep["pays"]
    mild = {t: 0.01 * (1 + 0.2 * (t - 1)) for t in range(1, 18)}  # a fifth of a step
    engine, report = auto_budget(Engine(cfg, tr), params, prompts, max_new_tokens=30, cost=mild, probes=0,
                                 use_cache=False)
    assert 1 <= report["nodes"] < tr.shape.nodes and engine.drafter.shape.nodes == report["nodes"]
    flat = {1: 0.01, 17: 0.0101}
    engine_flat, report_flat = auto_budget(Engine(cfg, tr), params, prompts, max_new_tokens=30, cost=flat, probes=0,
                                           use_cache=False)
    assert report_flat["nodes"] >= report["nodes"]
    ar = generate(Engine(cfg), params, prompts, 30).token_ids
    assert generate(engine, params, prompts, 30).token_ids == ar
    assert generate(engine_steep, params, prompts, 30).token_ids == ar


def test_measure_forward_cost(tiny, tmp_path, monkeypatch):
    from spec_jax.policies.budget import measure_forward_cost

    monkeypatch.setenv("SPEC_JAX_CACHE", str(tmp_path))
    params, cfg = tiny
    cost = measure_forward_cost(params, cfg, sizes=(1, 2, 9), context=16, repeats=2)
    assert set(cost) == {1, 2, 9} and all(v > 0 for v in cost.values())
    assert list(tmp_path.glob("budget/*.json"))  # cached per device and model
    again = measure_forward_cost(params, cfg, sizes=(1, 9), context=16, repeats=2)
    assert again == {1: cost[1], 9: cost[9]}


# ----------------------------------------------------------------------------- suffix automaton

def test_suffix_automaton_longest_match_equals_brute_force():
    """Matching each token before adding it gives the longest suffix that occurred earlier, and the
    state's first end position is that suffix's first occurrence; alphabets of 2..5 tokens."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        text = rng.integers(0, 2 + trial % 4, size=int(rng.integers(1, 70))).tolist()
        sam, state, matched = SuffixAutomaton(), 0, 0
        for i, t in enumerate(text):
            state, matched = sam.advance(state, matched, t)
            sam.extend(t)
            state = sam.settle(state, matched)
            want, first_end = longest_earlier_match(text, i)
            assert matched == want, (trial, i)
            if want:
                assert sam.first_end[state] == first_end and sam.length[sam.link[state]] < matched <= sam.length[state]


def test_suffix_automaton_continuation_and_static_corpus(tmp_path):
    sam = SuffixAutomaton([1, 2, 3, 4, 1, 2])
    state, matched = 0, 0
    for t in (1, 2):
        state, matched = sam.advance(state, matched, t)
    assert matched == 2 and sam.continuation(state, 3) == [3, 4, 1]
    # A repeating text is drafted as repeating (the copy runs on from its own output).
    rep = SuffixAutomaton([5, 6, 5, 6])
    assert rep.continuation(rep.settle(rep.advance(rep.advance(0, 0, 5)[0], 1, 6)[0], 2), 5, wrap=True) == [
        5, 6, 5, 6, 5]
    np.save(tmp_path / "corpus.npy", np.array([9, 8, 7, 6, 5], np.int32))
    assert load_corpus(tmp_path / "corpus.npy", 10).text == [9, 8, 7, 6, 5]
    with pytest.raises(DataFormatError, match=r"corpus.npy: token id 9 at position 0 is outside .* \[0, 9\)"):
        load_corpus(tmp_path / "corpus.npy", 9)
    np.save(tmp_path / "bad.npy", np.zeros((2, 2)))
    with pytest.raises(DataFormatError, match="1-D integer"):
        load_corpus(tmp_path / "bad.npy", 10)
    with pytest.raises(DataFormatError, match="not found"):
        load_corpus(tmp_path / "missing.npy", 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match="latin1.txt:1: the corpus is not UTF-8"):
        load_corpus(tmp_path / "latin1.txt", 10)


def _automaton_drafts(text: list[int], k: int) -> list[tuple[int, list[int]]]:
    """(match length, draft) after each prefix text[:i+1], from the host suffix automaton."""
    sam, state, matched, out = SuffixAutomaton(), 0, 0, []
    for t in text:
        state, matched = sam.advance(state, matched, t)
        sam.extend(t)
        state = sam.settle(state, matched)
        out.append((matched, sam.continuation(state, k, wrap=True)))
    return out


def test_device_match_equals_the_suffix_automaton():
    """The on-device match array, advanced by 0 to `width` tokens at a time (as steps commit them) or
    read from a whole prompt, drafts exactly what the host automaton drafts: the same longest match,
    the continuation of its first occurrence, run on from its own output. Random texts over 2..6 tokens
    (short, overlapping matches), periodic texts and texts with long repeated stretches (matches of
    dozens of tokens), in a batch of rows with different lengths."""
    rng = np.random.default_rng(3)
    S, k, width = 96, 5, 4
    texts = []
    for trial in range(12):
        kind = trial % 3
        if kind == 0:
            t = rng.integers(0, 2 + trial % 5, size=S - 8)
        elif kind == 1:
            t = np.resize(rng.integers(0, 50, size=int(rng.integers(1, 7))), S - 8)
        else:
            base = rng.integers(0, 50, size=30)
            noise = rng.integers(0, 50, size=S)
            t = np.concatenate([base, noise[:5], base, base[:20], noise[5:]])[: S - 8]
        texts.append(t.tolist())
    want = [_automaton_drafts(t, k) for t in texts]
    tokens = jnp.asarray(np.array([t + [0] * (S - len(t)) for t in texts]), jnp.int32)
    B = len(texts)
    ingest_j = jax.jit(ingest, static_argnums=4)
    draft_j = jax.jit(own_draft, static_argnums=3)

    def check(match, end, where):
        draft, length = (np.asarray(x) for x in draft_j(match, tokens, end, k))
        for b in range(B):
            m, cont = want[b][int(end[b])]
            assert int(length[b]) == m, (where, b, int(end[b]))
            if m:
                assert draft[b].tolist() == cont, (where, b, int(end[b]))

    # Step by step from a prompt of 1..20 tokens, committing 0..width tokens per row and step.
    lens = jnp.asarray(rng.integers(0, 20, size=B), jnp.int32)
    match = ingest_prompt(tokens, lens)
    end = np.asarray(lens)
    check(match, end, "prompt")
    while (end < S - 9).any():
        count = np.minimum(rng.integers(0, width + 1, size=B), S - 9 - end)
        match = ingest_j(match, tokens, jnp.asarray(end), jnp.asarray(count), width)
        end = end + count
        check(match, end, "step")
    # Whole prompts as long as the texts (the prefill path, many chunks).
    full = np.full((B,), S - 9)
    check(ingest_prompt(tokens, jnp.asarray(full, jnp.int32), width=7), full, "long prompt")


def test_sam_drafts_from_corpus_and_reports_host_time(tiny):
    """A corpus holding the AR continuation is drafted from and accepted; host time is measured."""
    params, cfg = tiny
    prompt = np.random.default_rng(5).integers(3, 256, size=10).tolist()
    ar = generate(Engine(cfg), params, [prompt], 30).token_ids[0]
    plain = generate(Engine(cfg, SuffixAutomatonDrafter(k=4)), params, [prompt], 30)
    corpus = SuffixAutomaton(prompt[-4:] + ar)
    with_corpus = generate(Engine(cfg, SuffixAutomatonDrafter(k=4, corpus_bias=0, host_state=_host(corpus))),
                           params, [prompt], 30)
    assert plain.token_ids[0] == with_corpus.token_ids[0] == ar
    assert with_corpus.tau > plain.tau and with_corpus.tau > 2.5
    assert with_corpus.host_seconds > 0 and plain.host_seconds == 0  # the own text is matched on device


def _host(corpus):
    from spec_jax.drafters.suffix_automaton import SAMHost

    return SAMHost(corpus)


def test_sam_host_rebuilds_for_a_new_request():
    from spec_jax.drafters.suffix_automaton import SAMHost

    host = SAMHost(SuffixAutomaton([1, 2, 3, 1, 2, 9]))
    buf = np.array([[7, 1, 2, 0, 0, 0, 0]])
    draft, valid, match = host.draft(buf, np.array([2]), 2)
    assert match[0] == 2 and draft[0].tolist() == [3, 1] and valid[0].all()  # first occurrence of [1, 2]
    other = np.array([[9, 1, 2, 9, 0, 0, 0]])  # a different text in the same slot: its own match from scratch
    draft, valid, match = host.draft(other, np.array([3]), 2)
    assert host.rows[0].seen.tolist() == [9, 1, 2, 9] and match[0] == 3 and not valid[0].any()


# ----------------------------------------------------------------------------- lookahead

def test_candidate_trie_merges_shared_prefixes():
    cand = jnp.array([[[5, 6, 7], [5, 6, 8], [9, 1, 1], [5, 2, 2]]])
    used = jnp.array([[True, True, True, False]])
    tokens, parents, valid = (np.asarray(a)[0] for a in candidate_trie(cand, used))
    # chain 1 shares 5,6 with chain 0: only its third node is new, under chain 0's second node.
    assert valid.tolist() == [True, True, True, False, False, True, True, True, True, False, False, False]
    assert parents.tolist()[:9] == [-1, 0, 1, -1, 0, 1, -1, 6, 7]
    assert parents[5] == 1 and tokens[5] == 8


def test_lookahead_pool_fills_and_its_drafts_verify(tiny):
    """Without prompt seeding, every accepted draft came from an n-gram the Jacobi window found."""
    params, cfg = tiny
    prompts = _repetitive_prompts()
    la = Lookahead(window=5, ngram=3, candidates=3, seed_from_prompt=False)
    engine = Engine(cfg, la)
    padded, lens = engine.pad_prompts(prompts)
    size = engine.cache_size(int(lens.max()), 48)
    state = engine.prefill(params, None, None, padded, lens, 48, 0, size)
    assert int(jnp.sum(state.drafter["count"])) == 0
    state = engine.run(params, None, state, 1 << 30)
    counts = np.asarray(state.drafter["count"])
    assert (counts.sum(axis=1) > 0).all()  # every sequence pooled n-grams
    pooled = np.asarray(state.drafter["pool"])
    assert pooled[counts > 0].any()
    assert (np.asarray(state.accepted_B) > 0).any(), "no pooled n-gram was ever accepted"
    assert engine.outputs(state) == generate(Engine(cfg), params, prompts, 48).token_ids


@dataclasses.dataclass(frozen=True)
class FullLogitsLookahead(Lookahead):
    """Lookahead as it was before its LM head was restricted: logits at every slot, the read ones picked out."""

    @property
    def shape(self):
        return dataclasses.replace(super().shape, verified=None)

    @property
    def observed_logits(self):
        return ()

    def observe(self, weights, state, result):
        read = np.r_[: 1 + super().shape.verified, list(super().observed_logits)]
        return super().observe(weights, state, result._replace(logits_BxTxV=result.logits_BxTxV[:, read]))


def test_lookahead_logits_only_where_read(tiny):
    """The target's LM head runs at the root, the verified trie and the top lookahead level only, and
    decoding (the pool, so every acceptance) is what logits at every slot would give. (Sampled runs
    verify the trie alone, so their random stream differs; their law is in test_lossless_sampling.)"""
    params, cfg = tiny
    la, la_full = Lookahead(window=3, ngram=4, candidates=2), FullLogitsLookahead(window=3, ngram=4, candidates=2)
    # 16 slots: the root, 2 candidate chains of 3 (slots 1-6), then 3 lookahead levels of 3 columns (7-15).
    assert Engine(cfg, la).logit_slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 13, 14, 15]
    assert Engine(cfg, la_full).logit_slots is None
    cut, full = (generate(Engine(cfg, d), params, _repetitive_prompts(), 40) for d in (la, la_full))
    assert cut.token_ids == full.token_ids and cut.node_hits == full.node_hits and cut.accepted == full.accepted
    assert sum(cut.accepted) > 0
