"""`early_exit`: greedy exactness, KV and exit-state reuse, the adapter, the recipe, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RECIPE_PROMPTS, assert_resume_exact

from spec_jax.decoding import Engine, generate
from spec_jax.drafters import registry
from spec_jax.drafters.early_exit import (
    EarlyExit,
    exit_logits,
    init_adapter,
    init_adapters,
    load_exit_choice,
    save_exit_heads,
)
from spec_jax.drafters.head_checkpoints import heads_meta
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.models import forward, init_cache
from spec_jax.policies import make_policy


def _weakened(params, cfg, n: int, scale: float):
    """The model with the residual writes of layers >= n scaled down: its exit at n agrees often, not always,
    so drafts are both accepted and rejected."""
    out = dict(params)
    for i in range(n, cfg.num_layers):
        layer = jax.tree.map(lambda x: x, params[f"layers_{i}"])
        layer["self_attn"]["o_proj"]["kernel"] = layer["self_attn"]["o_proj"]["kernel"] * scale
        layer["mlp"]["down_proj"]["kernel"] = layer["mlp"]["down_proj"]["kernel"] * scale
        out[f"layers_{i}"] = layer
    return out


def _adapter(cfg, seed=1, scale=0.05):
    a = init_adapter(cfg, 8, jax.random.key(seed))
    return {**a, "up": jax.random.normal(jax.random.key(seed + 1), a["up"].shape) * scale / np.sqrt(8)}


@pytest.mark.parametrize("n,policy,adapter,vocab", [(1, "fixed", False, 0), (2, "fixed", True, 0),
                                                    (3, "svip", False, 0), (2, "heuristic", True, 128),
                                                    (2, "thompson", False, 0)],
                         ids=["exit1", "exit2-adapter", "exit3-svip", "exit2-heuristic-vocab", "exit2-thompson"])
def test_greedy_exact_batched_and_single(n, policy, adapter, vocab, tiny, prompts):
    from spec_jax.drafters.vocab import reduced_vocab

    params, cfg = tiny
    params = _weakened(params, cfg, n, 0.3)
    weights = {"adapter": _adapter(cfg)} if adapter else {}
    if vocab:
        weights["vocab"] = reduced_vocab(params, cfg, np.random.default_rng(0).permutation(cfg.vocab_size), vocab)
    engine = Engine(cfg, EarlyExit(exit_layer=n, policy=make_policy(policy, 3)))
    ar = generate(Engine(cfg), params, prompts, 20).token_ids
    g = generate(engine, params, prompts, 20, weights=weights)
    assert g.token_ids == ar
    assert g.stats()["tau"] > 1.05  # drafts were accepted: the reused entries were committed
    assert generate(engine, params, [prompts[1]], 20, weights=weights).token_ids[0] == ar[1]


def test_verification_reuses_the_draft_cache_and_matches_a_full_forward(tiny, prompts):
    """After one step, every committed K/V entry (all layers) equals a full forward over the committed tokens,
    and the upper layers ran from the exit states: the early layers were not recomputed."""
    params, cfg = tiny
    params = _weakened(params, cfg, 2, 0.2)
    engine = Engine(cfg, EarlyExit(exit_layer=2, policy=make_policy("fixed", 3)))
    padded, lens = engine.pad_prompts(prompts)
    size = engine.cache_size(int(lens.max()), 16)
    state = engine.prefill(params, {}, None, padded, lens, 16, 0, size)
    committed0 = np.asarray(state.cache.lengths)
    calls = []
    real = EarlyExit.verify_forward

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append((args[-3], out.cache))  # the cache handed to verification, and the one it returned
        return out

    EarlyExit.verify_forward = spy
    try:
        state = engine.step(params, {}, state)  # eagerly, so the spy sees arrays
    finally:
        EarlyExit.verify_forward = real
    committed = np.asarray(state.cache.lengths)
    assert np.all(committed > committed0 + 1), committed - committed0  # drafts accepted in every sequence
    (before, after), = calls
    for layer in range(2):  # verification left the early layers' entries as drafting wrote them
        np.testing.assert_array_equal(np.asarray(after.k[layer]), np.asarray(before.k[layer]))
        np.testing.assert_array_equal(np.asarray(after.v[layer]), np.asarray(before.v[layer]))
    tokens = np.asarray(state.tokens_BxS)
    B, S = tokens.shape
    full = forward(params, cfg, jnp.asarray(tokens[:, :S]), jnp.broadcast_to(jnp.arange(S), (B, S)),
                   init_cache(cfg, B, S), compute_logits=False).cache
    for layer in range(cfg.num_layers):
        for got, want in ((state.cache.k[layer], full.k[layer]), (state.cache.v[layer], full.v[layer])):
            for b in range(B):
                np.testing.assert_allclose(np.asarray(got[b, : committed[b]]), np.asarray(want[b, : committed[b]]),
                                           rtol=0, atol=1e-5)


def test_zero_adapter_is_plain_early_exit(tiny, prompts):
    params, cfg = tiny
    h = jax.random.normal(jax.random.key(5), (3, cfg.hidden_size))
    np.testing.assert_array_equal(exit_logits(init_adapter(cfg, 16, jax.random.key(0)), params, cfg, h),
                                  exit_logits(None, params, cfg, h))
    zero = init_adapters(cfg, (2,), 16, jax.random.key(0))["exit_2"]
    engine = Engine(cfg, EarlyExit(exit_layer=2, policy=make_policy("fixed", 3)))
    plain = generate(engine, params, prompts, 16, weights={})
    adapted = generate(engine, params, prompts, 16, weights={"adapter": zero})
    assert adapted.token_ids == plain.token_ids and adapted.stats()["tau"] == plain.stats()["tau"]


def test_exit_layer_outside_the_model_is_refused_with_the_range(tiny, tmp_path):
    _, cfg = tiny
    for n in (4, 9):
        with pytest.raises(InvalidArgumentError, match=rf"--exit-layer {n}: outside this 4-layer model; give an exit "
                                                       r"layer in \[1, 3\]"):
            registry.validate("early_exit", {"exit_layer": n, "exit_head": "none"}, cfg)
    with pytest.raises(InvalidArgumentError, match="exit layer 0: .* in \\[1, 3\\]"):
        EarlyExit(exit_layer=0).check(cfg, {}, None)
    bad = tmp_path / "exit.json"
    bad.write_text(json.dumps({"exit_layer": 7, "k": 2, "num_layers": 4}))
    with pytest.raises(DataFormatError, match=r"exit layer 7 is outside this model's valid exits \[1, 3\]"):
        load_exit_choice(bad, cfg)
    bad.write_text(json.dumps({"exit_layer": 2, "k": 3, "num_layers": 4}))
    assert load_exit_choice(bad, cfg) == (2, 3)


def test_adapters_for_another_model_are_refused(tiny, tmp_path):
    _, cfg = tiny
    other = cfg.replace(num_layers=6)
    save_exit_heads(tmp_path / "other", init_adapters(other, (2,), 8, jax.random.key(0)), heads_meta(other), 8)
    with pytest.raises(DataFormatError, match="num_layers 6, this model has 4"):
        registry.validate("early_exit", {"exit_head": str(tmp_path / "other"), "exit_layer": 2}, cfg)
    save_exit_heads(tmp_path / "mine", init_adapters(cfg, (1, 3), 8, jax.random.key(0)), heads_meta(cfg), 8)
    with pytest.raises(InvalidArgumentError, match=r"has adapters for exits \[1, 3\], not 2"):
        registry.validate("early_exit", {"exit_head": str(tmp_path / "mine"), "exit_layer": 2}, cfg)
    registry.validate("early_exit", {"exit_head": str(tmp_path / "mine"), "exit_layer": 3}, cfg)


# ----------------------------------------------------------------------------- the recipe

def _recipe(tmp_path, data_dir, curriculum="none", **train):
    from spec_jax.training.recipes import Recipe

    return Recipe.from_mapping({
        "recipe": "early_exit", "data": str(data_dir), "out": str(tmp_path / "exits"), "exit_layers": [1],
        "adapter_rank": 16, "curriculum": curriculum, "starts_per_row": 8, "eval_rows": 2, "tau_prompts": 2,
        "tau_tokens": 12,
        "train": {"output_dir": str(tmp_path / "run"), "total_steps": 12, "batch_size": 2, "learning_rate": 0.01,
                  "checkpoint_every": 6, "eval_every": 6, **train}}, source="test recipe")


def test_recipe_trains_saves_and_decodes(tmp_path, data_dir, target, tiny_hf_dir, capsys):
    from spec_jax.cli import main
    from spec_jax.training import read_records
    from spec_jax.training.recipes import run_recipe

    metrics = run_recipe(_recipe(tmp_path, data_dir), target=target, progress=False)
    assert metrics["steps"] == 12 and len(metrics["exit_top1"]) == 1 and metrics["real_tau"] >= 1.0
    losses = [r["loss"] for r in read_records(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses  # it learns
    saved = json.loads((tmp_path / "exits" / "config.json").read_text())
    assert saved["head_type"] == "early_exit" and saved["exit_layers"] == [1] and saved["default_exit"] == 1
    out = []
    for flags in ([], ["--method", "early_exit", "--exit-head", str(tmp_path / "exits")]):
        assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", RECIPE_PROMPTS[0], "--max-new-tokens", "12",
                     "--json", "--no-phase-timing", *flags]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert out[1]["token_ids"] == out[0]["token_ids"]


@pytest.mark.parametrize("curriculum", ["rotational", "gradual"])
def test_recipe_resume_is_exact(curriculum, tmp_path, data_dir, target):
    """A run interrupted after its step-6 checkpoint and started again ends with the parameters of a run never
    stopped (the curriculum is a function of the step, the batches too)."""
    from spec_jax.training.data import TrainingData
    from spec_jax.training.exit_recipe import exit_parts

    data = TrainingData(data_dir)

    def parts_for(name):
        recipe = _recipe(tmp_path / name, data_dir, curriculum)
        return recipe, exit_parts(recipe, data, len(data) - 2, target, None)

    assert_resume_exact(parts_for, lambda name: tmp_path / name / "run", stop_at=8, resumed_from=6)


def test_curricula_and_loss_scales():
    from spec_jax.training.exit_recipe import enabled_exits, loss_scales

    assert enabled_exits("rotational", 4, 0, 10, 2).tolist() == [True, False, True, False]
    assert enabled_exits("rotational", 4, 1, 10, 2).tolist() == [False, True, False, True]
    assert enabled_exits("gradual", 4, 0, 10, 2).tolist() == [False, False, False, True]
    assert enabled_exits("gradual", 4, 3, 10, 2).tolist() == [False, False, True, True]  # 0.6 >= 2/4
    assert enabled_exits("gradual", 4, 5, 10, 2).tolist() == [True] * 4
    # LayerSkip's sum_l: exits after 4, 8, 12 layers weigh 1+2+3+4 = 10, 36 and 78; the middle one off.
    np.testing.assert_allclose(loss_scales(jnp.array([4, 8, 12]), jnp.array([True, False, True])),
                               [10 / 88, 0.0, 78 / 88], rtol=1e-6)
    np.testing.assert_allclose(loss_scales(jnp.array([4, 8, 12]), jnp.array([True, True, True])),
                               [10 / 124, 36 / 124, 78 / 124], rtol=1e-6)


def test_search_exit_writes_a_choice_that_generate_reads(tiny_hf_dir, tmp_path, capsys):
    from spec_jax.cli import main

    out = tmp_path / "exit.json"
    assert main(["search-exit", "--model", str(tiny_hf_dir), "--out", str(out), "--exits", "1", "--max-k", "2",
                 "--top", "1", "--num-prompts", "1", "--calib-tokens", "8", "--time-tokens", "8"]) == 0
    saved = json.loads(out.read_text())
    assert saved["exit_layer"] == 1 and saved["k"] in (1, 2) and saved["measured_speedup"] > 0
    assert len(saved["candidates"]) == 2 and saved["num_layers"] == 2
    capsys.readouterr()
    runs = []
    for flags in ([], ["--method", "early_exit", "--exit-file", str(out)]):
        assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", RECIPE_PROMPTS[1], "--max-new-tokens", "12",
                     "--json", "--no-phase-timing", *flags]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[1]["token_ids"] == runs[0]["token_ids"]
    assert len(runs[1]["acceptance_by_depth"]) == saved["k"]  # the file's draft length reached the drafter


def test_search_exit_refuses_an_exit_outside_the_model(tiny_hf_dir, tmp_path, capsys):
    from spec_jax.cli import main

    assert main(["search-exit", "--model", str(tiny_hf_dir), "--out", str(tmp_path / "e.json"), "--exits", "1,5"]) == 2
    assert "--exits 5: outside this 2-layer model; give an exit layer in [1, 1]" in capsys.readouterr().err
