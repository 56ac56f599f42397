"""Speculative decoding is lossless under greedy decoding, batched or not, for every drafter."""

import jax
import pytest

from spec_jax.decoding import Engine, generate
from spec_jax.drafters import Drafter
from spec_jax.drafters.draft_model import DraftModel
from spec_jax.drafters.layer_skip import LayerSkip, load_skip_set, save_skip_set, search_skip_set
from spec_jax.errors import CacheOverflowError, DataFormatError, InvalidArgumentError, TokenizerMismatchError
from spec_jax.models import init_params, truncate
from spec_jax.policies import make_policy


def _drafters(params, cfg):
    dparams, dcfg = truncate(params, cfg, 2)
    out = []
    for policy in ("fixed", "heuristic", "svip"):
        out.append((DraftModel(draft_cfg=dcfg, policy=make_policy(policy, 4)), dparams))
        out.append((LayerSkip(skip=(1, 2), policy=make_policy(policy, 3)), None))
    return out


def test_greedy_exact_every_drafter_batched_and_single(tiny, prompts):
    params, cfg = tiny
    ar = generate(Engine(cfg), params, prompts, 24).token_ids
    for drafter, dparams in _drafters(params, cfg):
        batched = generate(Engine(cfg, drafter), params, prompts, 24, draft_params=dparams)
        assert batched.token_ids == ar, drafter
        single = [generate(Engine(cfg, drafter), params, [p], 24, draft_params=dparams).token_ids[0]
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
    assert generate(Engine(cfg, full), params, prompts, 20, draft_params=params).token_ids == ar
    g = generate(Engine(cfg, full), params, prompts, 20, draft_params=params)
    assert g.tau > 4.0


def test_eos_and_max_new_respected(tiny, prompts):
    params, cfg = tiny
    ar = generate(Engine(cfg), params, prompts, 16).token_ids
    eos = ar[0][5]
    cfg_eos = cfg.replace(eos_token_ids=(eos,))
    dparams, dcfg = truncate(params, cfg_eos, 2)
    for drafter, dp in [(Drafter(), None), (DraftModel(draft_cfg=dcfg), dparams)]:
        out = generate(Engine(cfg_eos, drafter), params, prompts, 16, draft_params=dp).token_ids
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
                 draft_params=init_params(other, jax.random.key(0)))
    with pytest.raises(InvalidArgumentError, match="skip set"):
        generate(Engine(cfg, LayerSkip(skip=(0, 1, 2, 3))), params, [[1, 2]], 5)


def test_skip_set_search_and_file(tiny, prompts, tmp_path):
    params, cfg = tiny
    seqs = [p + o for p, o in zip(prompts, generate(Engine(cfg), params, prompts, 16).token_ids, strict=True)]
    result = search_skip_set(params, cfg, seqs, max_skip=2, k=3)
    assert len(result["history"]) == 2 and 0 <= result["agreement"] <= 1
    path = save_skip_set(result, tmp_path / "skip.json", "tiny")
    assert load_skip_set(path, cfg) == tuple(result["skip"])
    path.write_text("{not json")
    with pytest.raises(DataFormatError, match="skip-set"):
        load_skip_set(path, cfg)
