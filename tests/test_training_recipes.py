"""A head recipe end to end on a tiny model: data -> training -> heads saved -> decoding with them."""

import json

import numpy as np
import pytest
from conftest import RECIPE_PROMPTS

from spec_jax.errors import InvalidArgumentError


def _recipe(tmp_path, data_dir, **train):
    from spec_jax.training.recipes import Recipe

    return Recipe.from_mapping({
        "recipe": "medusa", "data": str(data_dir), "out": str(tmp_path / "heads"), "num_heads": 2,
        "windows_per_row": 4, "eval_rows": 2, "tau_prompts": 2, "tau_tokens": 12, "tau_tree": "chain",
        "train": {"output_dir": str(tmp_path / "run"), "total_steps": 12, "batch_size": 2, "learning_rate": 0.05,
                  "checkpoint_every": 6, "eval_every": 6, **train}}, source="test recipe")


def test_medusa_recipe_trains_saves_and_decodes(tmp_path, data_dir, target, tiny_hf_dir, capsys):
    from spec_jax.cli import main
    from spec_jax.training import read_records
    from spec_jax.training.recipes import run_recipe

    recipe = _recipe(tmp_path, data_dir)
    metrics = run_recipe(recipe, target=target, progress=False)
    assert metrics["steps"] == 12 and np.isfinite(metrics["final_loss"])
    assert metrics["sim_tau"] >= 1.0 and len(metrics["head_top1"]) == 2 and metrics["real_tau"] >= 1.0
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses  # it learns
    assert [r["step"] for r in records if "eval" in r][-1] == 12
    saved = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert saved["head_type"] == "medusa" and saved["num_heads"] == 2 and saved["metrics"]["real_tau"] >= 1.0
    assert len(saved["data_manifest_sha256"]) == 64
    # The saved heads decode through the CLI, greedy-exact against AR.
    out = []
    for flags in ([], ["--method", "medusa", "--heads", str(tmp_path / "heads"), "--medusa-tree", "chain"]):
        assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", RECIPE_PROMPTS[0], "--max-new-tokens", "12",
                     "--json", "--no-phase-timing", *flags]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert out[1]["token_ids"] == out[0]["token_ids"]


def test_recipe_settings_refused_clearly(tmp_path, data_dir):
    from spec_jax.training.recipes import Recipe

    with pytest.raises(InvalidArgumentError, match="unknown key 'num_head'"):
        Recipe.from_mapping({"recipe": "medusa", "data": "d", "out": "o", "train": {}, "num_head": 2}, "r.yaml")
    with pytest.raises(InvalidArgumentError, match=r"recipe: must be one of medusa, hydra, eagle, .*got .eagle9."):
        Recipe.from_mapping({"recipe": "eagle9", "data": "d", "out": "o", "train": {}}, "r.yaml")
    with pytest.raises(InvalidArgumentError, match="num_heads: must be an integer in"):
        _recipe(tmp_path, data_dir).from_mapping({"recipe": "medusa", "data": "d", "out": "o", "num_heads": 0,
                                                   "train": {"output_dir": "x", "total_steps": 1}}, "r.yaml")


def test_shipped_recipes_parse():
    from pathlib import Path

    from spec_jax.training.recipes import load_recipe

    configs = Path(__file__).parents[1] / "configs"
    recipe = load_recipe(str(configs / "medusa_smollm2.yaml"))
    assert recipe.recipe == "medusa" and recipe.out == "spec_jax/heads/medusa_smollm2"
    eagle3 = load_recipe(str(configs / "eagle3_smollm2.yaml"))
    assert eagle3.feature_layers == (2, 15, 28) and eagle3.ttt_steps == 3 and eagle3.draft_vocab == 8192
    assert load_recipe(str(configs / "eagle1_smollm2.yaml")).feature_layers == ()


def test_hydra_recipe_trains_saves_and_decodes(tmp_path, data_dir, target, tiny_hf_dir, capsys):
    from spec_jax.cli import main
    from spec_jax.training import read_records
    from spec_jax.training.recipes import Recipe, run_recipe

    recipe = Recipe.from_mapping({
        "recipe": "hydra", "data": str(data_dir), "out": str(tmp_path / "hydra"), "num_heads": 2, "prefix_layer": True,
        "windows_per_row": 4, "eval_rows": 2, "tau_prompts": 2, "tau_tokens": 12, "tau_tree": "chain",
        "train": {"output_dir": str(tmp_path / "run"), "total_steps": 10, "batch_size": 2, "learning_rate": 0.01,
                  "checkpoint_every": 5, "eval_every": 5}}, source="test recipe")
    metrics = run_recipe(recipe, target=target, progress=False)
    assert metrics["steps"] == 10 and metrics["sim_tau"] >= 1.0 and len(metrics["head_top1"]) == 2
    losses = [r["loss"] for r in read_records(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses  # it learns
    saved = json.loads((tmp_path / "hydra" / "config.json").read_text())
    assert saved["head_type"] == "hydra" and saved["prefix_layer"] is True and saved["metrics"]["real_tau"] >= 1.0
    out = []
    for flags in ([], ["--method", "hydra", "--heads", str(tmp_path / "hydra"), "--hydra-tree", "chain"]):
        assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", RECIPE_PROMPTS[0], "--max-new-tokens", "12",
                     "--json", "--no-phase-timing", *flags]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert out[1]["token_ids"] == out[0]["token_ids"]


@pytest.mark.parametrize("layers,vocab", [([], 0), ([1, 2], 256)], ids=["eagle1", "eagle3-vocab"])
def test_eagle_recipe_trains_saves_and_decodes(layers, vocab, tmp_path, data_dir, target, tiny_hf_dir, capsys):
    from spec_jax.cli import main
    from spec_jax.training import read_records
    from spec_jax.training.recipes import Recipe, run_recipe

    recipe = Recipe.from_mapping({
        "recipe": "eagle", "data": str(data_dir), "out": str(tmp_path / "eagle"), "feature_layers": layers,
        "ttt_steps": 2 if layers else 1, "regression": 0.0 if layers else 1.0, "soft_ce": 1.0 if layers else 0.1,
        "draft_vocab": vocab, "starts_per_row": 4, "eval_rows": 2, "tau_prompts": 2, "tau_tokens": 12,
        "sim_steps": 3, "tau_depth": 3, "tau_budget": 6,
        "train": {"output_dir": str(tmp_path / "run"), "total_steps": 10, "batch_size": 2, "learning_rate": 0.003,
                  "checkpoint_every": 5, "eval_every": 5}}, source="test recipe")
    metrics = run_recipe(recipe, target=target, progress=False)
    assert metrics["steps"] == 10 and metrics["sim_tau"] >= 1.0 and len(metrics["step_top1"]) == 3
    assert metrics["real_tau"] >= 1.0 and metrics["tau_nodes"] == 6
    losses = [r["loss"] for r in read_records(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses  # it learns
    saved = json.loads((tmp_path / "eagle" / "config.json").read_text())
    assert saved["head_type"] == "eagle" and saved["feature_layers"] == layers
    assert (tmp_path / "eagle" / "token_ranking.npy").is_file()
    out = []
    for flags in ([], ["--method", "eagle", "--heads", str(tmp_path / "eagle"), "--draft-vocab", str(vocab)]):
        assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", RECIPE_PROMPTS[0], "--max-new-tokens", "12",
                     "--json", "--no-phase-timing", *flags]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert out[1]["token_ids"] == out[0]["token_ids"]
