"""Speculative decoding is lossless under greedy decoding, batched or not, for every drafter."""

import jax
import pytest

from spec_jax.decoding import Engine, generate
from spec_jax.drafters import Drafter
from spec_jax.drafters.draft_model import DraftModel, DraftModelTree
from spec_jax.drafters.dynamic_tree import DynamicTree
from spec_jax.drafters.layer_skip import LayerSkip, load_skip_set, save_skip_set, search_skip_set
from spec_jax.errors import CacheOverflowError, DataFormatError, InvalidArgumentError, TokenizerMismatchError
from spec_jax.models import init_params, truncate
from spec_jax.policies import make_policy


def _drafters(params, cfg):
    dparams, dcfg = truncate(params, cfg, 2)
    out = [(DraftModelTree(draft_cfg=dcfg, tree=DynamicTree(depth=3, width=2, k=3, budget=7)), dparams),
           (DraftModelTree(draft_cfg=dcfg, tree=DynamicTree(depth=2, width=2, k=2, sampled=True)), dparams)]
    for policy in ("fixed", "heuristic", "svip"):
        out.append((DraftModel(draft_cfg=dcfg, policy=make_policy(policy, 4)), dparams))
        out.append((LayerSkip(skip=(1, 2), policy=make_policy(policy, 3)), None))
    return out


def test_greedy_exact_every_drafter_batched_and_single(tiny, prompts):
    params, cfg = tiny
    ar = generate(Engine(cfg), params, prompts, 24).token_ids
    for drafter, dparams in _drafters(params, cfg):
        batched = generate(Engine(cfg, drafter), params, prompts, 24, weights=dparams)
        assert batched.token_ids == ar, drafter
        single = [generate(Engine(cfg, drafter), params, [p], 24, weights=dparams).token_ids[0]
                  for p in prompts[:2]]
        assert single == ar[:2], drafter


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_exact_many_models(seed, prompts):
    from tests.conftest import TINY

    cfg = TINY.replace(num_layers=3)
    params = init_params(cfg, jax.random.key(seed + 10))
    ar = generate(Engine(cfg), params, prompts, 20).token_ids
    # A draft model that is the target itself accepts everything: exercises full-accept paths.
    full = DraftModel(draft_cfg=cfg, policy=make_policy("fixed", 5))
    assert generate(Engine(cfg, full), params, prompts, 20, weights=params).token_ids == ar
    g = generate(Engine(cfg, full), params, prompts, 20, weights=params)
    assert g.tau > 4.0


@pytest.mark.parametrize("spec", [DynamicTree(3, 1, 1, 3), DynamicTree(4, 2, 3, 12), DynamicTree(3, 3, 3, 5),
                                  DynamicTree(4, 2, 2, 3)])  # a budget below the depth
def test_dynamic_tree_with_perfect_draft_accepts_its_deepest_path(spec, prompts):
    """A draft equal to the target always has the target's argmax among its top-1 children, so every
    step accepts as deep as the kept tree reaches; the draft cache commit keeps it in sync."""
    from tests.conftest import TINY

    cfg = TINY.replace(num_layers=3)
    params = init_params(cfg, jax.random.key(7))
    ar = generate(Engine(cfg), params, prompts, 30).token_ids
    g = generate(Engine(cfg, DraftModelTree(draft_cfg=cfg, tree=spec)), params, prompts, 30, weights=params)
    assert g.token_ids == ar
    if spec.width == 1:  # a chain: every step commits depth + 1 tokens except near the end
        assert g.tau > spec.depth + 0.5
    assert g.acceptance_by_depth[0] == 1.0


def test_dynamic_tree_shape(tiny):
    """Kept nodes form a breadth-first tree: parents precede children, depth = parent depth + 1."""
    import jax.numpy as jnp
    import numpy as np

    from spec_jax.drafters.dynamic_tree import draft_dynamic_tree
    from spec_jax.sampling import Sampling
    from spec_jax.trees import ancestor_mask

    spec = DynamicTree(depth=4, width=3, k=3, budget=14)
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(256, 256)) * 2, jnp.float32)  # toy bigram "draft model"

    def tree_step(cache, tokens, positions, mask, parent_slots):
        assert mask.shape[1] == tokens.shape[1] and mask.shape[2] % tokens.shape[1] == 0
        return table[tokens], cache

    tree, fed, _ = draft_dynamic_tree(tree_step, None, table[jnp.array([5, 9])], jnp.array([3, 4]), spec,
                                      Sampling(), jax.random.key(0))
    parents, depth = np.asarray(tree.parents), np.asarray(tree.depth)
    assert tree.tokens.shape == (2, 14)
    for b in range(2):
        for i, p in enumerate(parents[b]):
            assert p < i and depth[b, i] == (1 if p < 0 else depth[b, p] + 1)
            if p >= 0:
                assert tree.tokens[b, i] in np.argsort(-np.asarray(table[tree.tokens[b, p]]))[:3]
        np.testing.assert_array_equal(np.asarray(tree.mask[b]), ancestor_mask(parents[b]))
    # Greedy chain of the bigram table is kept (its cumulative log-probability is the highest).
    top = int(jnp.argmax(table[5]))
    assert int(tree.tokens[0, 0]) == top


def test_phase_timed_run_equals_fused(tiny, prompts):
    params, cfg = tiny
    dparams, dcfg = truncate(params, cfg, 2)
    for drafter, dp in [(Drafter(), None), (DraftModel(draft_cfg=dcfg), dparams), (LayerSkip(skip=(1,)), None)]:
        fused = generate(Engine(cfg, drafter), params, prompts, 16, weights=dp)
        timed = generate(Engine(cfg, drafter), params, prompts, 16, weights=dp, time_phases=True)
        assert timed.token_ids == fused.token_ids
        assert timed.draft_seconds > 0 and timed.verify_seconds > 0
        assert timed.draft_seconds + timed.verify_seconds <= timed.seconds
        assert fused.stats()["draft_seconds"] is None


@pytest.mark.parametrize("time_phases", [False, True])
def test_compilation_is_timed_apart_from_first_token_and_decoding(tiny, prompts, time_phases):
    """A cold run's compilation leaves the first-token and decoding times; a warm run compiles nothing."""
    from spec_jax.sampling import Sampling

    params, cfg = tiny
    # A sampling setting no other test uses: a new engine, so the first run compiles its programs.
    engine = Engine(cfg, LayerSkip(skip=(1,)), sampling=Sampling(temperature=0.61803, top_k=7 if time_phases else 8))
    cold, warm = (generate(engine, params, prompts, 12, time_phases=time_phases) for _ in range(2))
    assert cold.token_ids == warm.token_ids
    for g in (cold, warm):
        assert g.decode_tokens == g.new_tokens - len(prompts) > 0
        assert 0 < g.first_token_seconds <= g.prefill_seconds and 0 < g.decode_seconds <= g.seconds - g.prefill_seconds
        # What the two figures leave out is compilation (the rest of compile_seconds is the drafter audit's).
        assert g.seconds - g.first_token_seconds - g.decode_seconds <= g.compile_seconds + 1e-6
        assert g.stats()["decode_tokens_per_second"] == round(g.decode_tokens / g.decode_seconds, 3)
        if time_phases:
            assert g.draft_seconds + g.verify_seconds <= g.decode_seconds
    assert cold.seconds - cold.first_token_seconds - cold.decode_seconds > 0 and warm.compile_seconds == 0


def test_eos_and_max_new_respected(tiny, prompts):
    params, cfg = tiny
    ar = generate(Engine(cfg), params, prompts, 16).token_ids
    eos = ar[0][5]
    cfg_eos = cfg.replace(eos_token_ids=(eos,))
    dparams, dcfg = truncate(params, cfg_eos, 2)
    for drafter, dp in [(Drafter(), None), (DraftModel(draft_cfg=dcfg), dparams)]:
        out = generate(Engine(cfg_eos, drafter), params, prompts, 16, weights=dp).token_ids
        assert out[0] == ar[0][: ar[0].index(eos) + 1]
        assert all(len(o) <= 16 for o in out)


def test_stats_ar_tau_is_one(tiny, prompts):
    params, cfg = tiny
    g = generate(Engine(cfg), params, prompts, 10)
    assert g.tau == 1.0 and g.new_tokens == 30 and sum(g.target_forwards) == 30


def test_streaming_chunks_equal_one_call(tiny, prompts):
    params, cfg = tiny
    seen = []
    g = generate(Engine(cfg), params, prompts, 20, stream=seen.append, chunk_steps=3)
    assert g.token_ids == generate(Engine(cfg), params, prompts, 20).token_ids
    assert len(seen) > 3 and seen[-1] == g.token_ids


def test_bad_input_refused(tiny):
    params, cfg = tiny
    with pytest.raises(InvalidArgumentError, match="empty prompt"):
        generate(Engine(cfg), params, [[]], 5)
    with pytest.raises(CacheOverflowError, match="cache"):
        generate(Engine(cfg), params, [[1, 2, 3]], 70, cache_size=64)
    with pytest.raises(CacheOverflowError, match="positions"):
        generate(Engine(cfg), params, [[1] * 1000], 100)
    other = cfg.replace(vocab_size=300)
    with pytest.raises(TokenizerMismatchError, match="vocabulary"):
        generate(Engine(cfg, DraftModel(draft_cfg=other)), params, [[1, 2]], 5,
                 weights=init_params(other, jax.random.key(0)))
    with pytest.raises(InvalidArgumentError, match="skip set"):
        generate(Engine(cfg, LayerSkip(skip=(0, 1, 2, 3))), params, [[1, 2]], 5)


def test_skip_set_search_and_file(tiny, prompts, tmp_path):
    params, cfg = tiny
    seqs = [p + o for p, o in zip(prompts, generate(Engine(cfg), params, prompts, 16).token_ids, strict=True)]
    result = search_skip_set(params, cfg, seqs, max_skip=2, k=3)
    assert len(result["history"]) == 2 and 0 <= result["agreement"] <= 1
    path = save_skip_set(result, tmp_path / "skip.json", "tiny")
    assert load_skip_set(path, cfg) == (tuple(result["skip"]), result["k"])
    assert 1 <= result["k"] <= 3
    path.write_text("{not json")
    with pytest.raises(DataFormatError, match="skip-set"):
        load_skip_set(path, cfg)
