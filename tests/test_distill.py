"""Draft-model distillation (`recipe: draft`): divergences by hand, the recipe end to end on a tiny model
(fixed and on-policy data; it learns, resumes exactly, saves, decodes greedy-exact through `draft` and
`draft_tree`), the HF export against transformers, reduced vocabularies, and refused checkpoints."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RECIPE_PROMPTS, assert_resume_exact, make_recipe_data

from spec_jax.errors import DataFormatError, InvalidArgumentError, TokenizerMismatchError


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tv", "jsd"])
def test_divergences_by_hand(kind):
    from spec_jax.training.distill import divergence

    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6])
    m = (p + q) / 2
    want = {"fkl": sum(p * np.log(p / q)), "rkl": sum(q * np.log(q / p)), "tv": 0.5 * sum(abs(p - q)),
            "jsd": 0.5 * sum(p * np.log(p / m)) + 0.5 * sum(q * np.log(q / m))}[kind]
    # Logits are any shift of the log-probabilities.
    got = divergence(jnp.log(jnp.asarray(p))[None] + 3.0, jnp.log(jnp.asarray(q))[None] - 1.0, kind)
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5, atol=1e-6)
    same = divergence(jnp.asarray([[1.0, 2.0, 3.0]]), jnp.asarray([[1.0, 2.0, 3.0]]), kind)
    np.testing.assert_allclose(float(same[0]), 0.0, atol=1e-6)
    if kind == "jsd":
        assert float(divergence(jnp.asarray([[50.0, 0, 0]]), jnp.asarray([[0, 50.0, 0]]), kind)[0]) == \
            pytest.approx(math.log(2), abs=1e-4)  # JSD is bounded by log 2


def test_unknown_divergence_refused():
    from spec_jax.training.distill import divergence

    with pytest.raises(InvalidArgumentError, match="unknown divergence 'kl'; choose one of fkl, rkl, tv, jsd"):
        divergence(jnp.zeros((1, 3)), jnp.zeros((1, 3)), "kl")


@pytest.fixture(scope="module")
def sharp_hf_dir(tmp_path_factory, tiny_hf_dir):
    """The tiny random model with its matrices scaled up: peaked next-token distributions that a 1-layer draft
    starts far from (the random model's are near uniform, leaving nothing to learn)."""
    from spec_jax.models.loading import export_hf, load_hf
    from spec_jax.models.registry import load_tokenizer

    params, cfg = load_hf(tiny_hf_dir)
    params = jax.tree.map(lambda x: x * 4 if x.ndim == 2 else x, params)
    return export_hf(params, cfg, tmp_path_factory.mktemp("sharp") / "sharp-llama", load_tokenizer(tiny_hf_dir))


@pytest.fixture(scope="module")
def target(sharp_hf_dir):
    from spec_jax.decoding.setup import load_target

    return load_target(sharp_hf_dir, "float32")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sharp_hf_dir, target):
    return make_recipe_data(tmp_path_factory.mktemp("distill"), sharp_hf_dir, target, (target.cfg.num_layers,))


def _recipe(tmp_path, data_dir, **extra):
    from spec_jax.training.recipes import Recipe

    train = {"output_dir": str(tmp_path / "run"), "total_steps": 12, "batch_size": 2, "learning_rate": 0.01,
             "warmup_steps": 1, "checkpoint_every": 6, "eval_every": 6}
    return Recipe.from_mapping({
        "recipe": "draft", "data": str(data_dir), "out": str(tmp_path / "draft"), "draft_layers": 1,
        "starts_per_row": 8, "eval_rows": 2, "tau_prompts": 2, "tau_tokens": 12, "sim_steps": 3,
        "onpolicy_width": 64, "onpolicy_tokens": 4, **extra, "train": train}, source="test recipe")


@pytest.mark.parametrize("kind,onpolicy", [("fkl", 0), ("jsd", 1)], ids=["fixed-fkl", "onpolicy-jsd"])
def test_draft_recipe_trains_saves_and_decodes(kind, onpolicy, tmp_path, data_dir, target, sharp_hf_dir, capsys):
    from spec_jax.cli import main
    from spec_jax.training import read_records
    from spec_jax.training.recipes import run_recipe

    metrics = run_recipe(_recipe(tmp_path, data_dir, divergence=kind, onpolicy_rows=onpolicy), target=target,
                         progress=False)
    assert metrics["steps"] == 12 and metrics["real_tau"] >= 1.0 and 0 <= metrics["top1_agreement"] <= 1
    records = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses  # it learns
    assert ("onpolicy_div" in records[0]) == bool(onpolicy)
    saved = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert saved["head_type"] == "draft" and saved["draft_layers"] == 1 and saved["init_layers"] == [0]
    assert len(saved["tokenizer_sha256"]) == 64 and saved["recipe"]["divergence"] == kind
    # The saved draft decodes through the CLI, greedy-exact against AR, as a chain and as a tree.
    out = []
    common = ["generate", "--model", str(sharp_hf_dir), "--prompt", RECIPE_PROMPTS[0], "--max-new-tokens", "12",
              "--json", "--no-phase-timing"]
    for flags in ([], ["--method", "draft", "--draft-model", str(tmp_path / "draft"), "--draft-k", "3"],
                  ["--method", "draft_tree", "--draft-model", str(tmp_path / "draft")],
                  ["--method", "draft", "--draft-model", str(tmp_path / "draft"), "--draft-vocab", "300"]):
        assert main([*common, *flags]) == 0
        out.append(json.loads(capsys.readouterr().out))
    for o in out[1:]:
        assert o["token_ids"] == out[0]["token_ids"]
    # And at batch 3 through the library, with the heuristic length policy.
    from spec_jax.decoding import Engine, generate
    from spec_jax.drafters.draft_model import DraftModel, load_draft
    from spec_jax.drafters.registry import options_for
    from spec_jax.policies import make_policy

    prompts = [target.tokenizer.encode(p) for p in RECIPE_PROMPTS[:3]]
    weights, dcfg = load_draft(options_for("draft", {"draft_model": str(tmp_path / "draft")}), target)
    ar = generate(Engine(target.cfg), target.params, prompts, 12)
    spec = generate(Engine(target.cfg, DraftModel(draft_cfg=dcfg, policy=make_policy("heuristic", 4))),
                    target.params, prompts, 12, weights=weights)
    assert spec.token_ids == ar.token_ids


def test_draft_recipe_resumes_exactly(tmp_path, data_dir, target):
    """Interrupted after its step-6 checkpoint and started again, an on-policy run (its sampling keys come from
    the loop's RNG) ends with the parameters of a run never stopped."""
    from spec_jax.training.data import TrainingData
    from spec_jax.training.distill import draft_parts

    data = TrainingData(data_dir)

    def parts_for(name):
        recipe = _recipe(tmp_path / name, data_dir, onpolicy_rows=1)
        return recipe, draft_parts(recipe, data, len(data) - 2, target, None)

    assert_resume_exact(parts_for, lambda name: tmp_path / name / "run", stop_at=8, resumed_from=6)


@pytest.fixture(scope="module")
def saved_draft(tmp_path_factory, target):
    """A distilled-draft checkpoint of the tiny target (its last layer, untrained) and its full weights."""
    from spec_jax.drafters.draft_model import save_draft, share_embeddings
    from spec_jax.drafters.head_checkpoints import heads_meta
    from spec_jax.training.distill import init_draft

    own, dcfg = init_draft(target.params, target.cfg, (1,))
    path = save_draft(tmp_path_factory.mktemp("saved") / "draft", own, heads_meta(target.cfg), None, target.tokenizer)
    return path, share_embeddings(own, target.params, target.cfg), dcfg


def test_exported_draft_matches_transformers(tmp_path, saved_draft, target):
    """The HF export of a distilled draft (what `hf_assisted` runs) gives our logits in transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from spec_jax.drafters.draft_model import export_draft, load_draft
    from spec_jax.drafters.registry import options_for
    from spec_jax.models import forward, init_cache

    opts = options_for("draft", {"draft_model": str(saved_draft[0])})
    out = export_draft(opts, target, tmp_path / "hf")
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    tokens = np.array([[1, 50, 7, 3000, 12, 9]], np.int32)
    weights, dcfg = load_draft(opts, target)  # what `draft` runs (float16-stored layers, the target's embeddings)
    ours = forward(weights, dcfg, tokens, jnp.arange(6)[None], init_cache(dcfg, 1, 6)).logits
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_distilled_draft_for_another_model_refused(tmp_path, saved_draft, target):
    from spec_jax.drafters.draft_model import check_draft, load_distilled
    from spec_jax.drafters.registry import Target, options_for

    path, _, _ = saved_draft
    config = json.loads((path / "config.json").read_text())
    other = tmp_path / "other-vocab"
    other.mkdir()
    (other / "heads.safetensors").write_bytes((path / "heads.safetensors").read_bytes())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(DataFormatError, match="vocab_size 1000, this model has 49152"):
        check_draft(options_for("draft", {"draft_model": str(other)}), target.cfg)
    (other / "config.json").write_text(json.dumps({**config, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(TokenizerMismatchError, match="tokenizer maps tokens to other ids"):
        load_distilled(other, Target(params=target.params, cfg=target.cfg, tokenizer=target.tokenizer,
                                     dtype="float32", mesh=None))
    (other / "config.json").write_text(json.dumps({**config, "head_type": "eagle"}))
    with pytest.raises(DataFormatError, match="head_type is 'eagle', this method needs 'draft'"):
        check_draft(options_for("draft", {"draft_model": str(other)}), target.cfg)
    with pytest.raises(InvalidArgumentError, match="--draft-vocab needs trained heads"):
        check_draft(options_for("draft", {"draft_layers": 1, "draft_vocab": 100}), target.cfg)


def test_export_draft_command(tmp_path, saved_draft, sharp_hf_dir, capsys):
    from spec_jax.cli import main

    assert main(["export-draft", "--model", str(sharp_hf_dir), "--draft-model", str(saved_draft[0]), "--out",
                 str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 1
    bad = ["export-draft", "--model", str(sharp_hf_dir), "--draft-layers", "5", "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "--draft-layers 5: the target has only 2 layers" in capsys.readouterr().err
