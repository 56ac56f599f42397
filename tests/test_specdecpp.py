"""SpecDec++ (acceptance-prediction head) and EESD's Thompson-sampling length policy: the stop rule on hand-made
acceptance probabilities, the class-weighted BCE by hand, greedy exactness, the recipe (learns, resumes exactly,
decodes), and heads for another model or draft refused."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RECIPE_PROMPTS, assert_resume_exact

from spec_jax.decoding import Engine, generate
from spec_jax.drafters import specdecpp as sd
from spec_jax.drafters.chain import draft_chain
from spec_jax.drafters.draft_model import DraftModel
from spec_jax.errors import DataFormatError, InvalidArgumentError
from spec_jax.models import truncate
from spec_jax.policies import FixedLength, ThompsonLength, make_policy
from spec_jax.sampling import Sampling

# ----------------------------------------------------------------------------- the stop rule


def reference_k(rejects, threshold, min_k, max_k) -> int:
    """The reference implementation's loop (SpecDec_pp, hf_generation.py, schedule 'ada'), transcribed: after
    draft step j the head has judged drafts 1..j-1; stop when P(some rejected) > threshold, within [min, max]."""
    cum = 1.0
    for steps in range(1, 1000):
        cum *= 1.0 if steps == 1 else 1 - rejects[steps - 2]
        if steps >= max_k:
            return steps
        if steps >= min_k and 1 - cum > threshold:
            return steps
    raise AssertionError("unreachable")


def chain_lengths(rejects_BxK, threshold, min_k, max_k) -> list[int]:
    """Drafted lengths of `draft_chain` with a toy model whose features after feeding draft j are its hand-made
    rejection probability r_j (after the root: 0.99, which the rule must ignore)."""
    rejects_BxK = jnp.asarray(rejects_BxK, jnp.float32)
    B = rejects_BxK.shape[0]
    table = jnp.concatenate([jnp.full((B, 1), 0.99), rejects_BxK], axis=1)

    def model_step(calls_B, tokens, positions):
        feats = jnp.take_along_axis(table, calls_B[:, None], axis=1)  # [B, 1]: r of the token just fed
        return jnp.zeros((B, 4)), calls_B + 1, feats

    stop = sd.acceptance_stop(lambda f: f[:, 0], threshold, min_k)
    tree, calls = draft_chain(model_step, jnp.zeros((B,), jnp.int32), jnp.zeros((B, 1), jnp.int32),
                              jnp.zeros((B, 1), jnp.int32), FixedLength(max_k), FixedLength(max_k).init(B),
                              Sampling(0.0), jax.random.key(0), stop_fn=stop, stop_carry=jnp.ones((B,)))
    return np.asarray(tree.valid).sum(axis=1).tolist()


R = [[0.1, 0.2, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],  # P(some rejected) after 1, 2, 3 judged: 0.1, 0.28, 0.64
     [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 0.5 at once
     [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # never
     [0.06, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06]]  # 1 - 0.94^n: 0.06, .116, .169, .219, .266, .310


@pytest.mark.parametrize("threshold,min_k,max_k,expected", [
    (0.3, 2, 8, [4, 2, 8, 7]),  # row 0 stops after draft 4 (drafts 1..3 judged, 0.64 > 0.3)
    (0.3, 1, 8, [4, 2, 8, 7]),  # the first draft is never judged: nothing drafted before it
    (0.3, 5, 8, [5, 5, 8, 7]),  # the min clamp
    (0.3, 2, 3, [3, 2, 3, 3]),  # the max clamp
    (0.05, 2, 8, [2, 2, 8, 2]),  # a low threshold stops at the first judged risk
    (0.7, 2, 8, [8, 8, 8, 8]),  # 0.64 never exceeds 0.7
    (0.25, 2, 20, [3, 2, 20, 6]),  # row 0: 0.28 > 0.25 after draft 3
])
def test_stop_rule_on_hand_made_probabilities(threshold, min_k, max_k, expected):
    rejects = [r + [0.0] * (max_k - len(r)) for r in R]
    assert chain_lengths(rejects, threshold, min_k, max_k) == expected
    assert [reference_k(r, threshold, min_k, max_k) for r in rejects] == expected


def test_weighted_bce_by_hand():
    # Example 1: logits (0, 0), label 0.5: each class's -log p is log 2; weights 6 * 0.5 and 0.5.
    # Example 2: P(reject) = 3/4, label 1: -log P(accept) = log 4, weight 1.
    # Example 3 is masked out (its loss would be huge).
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [50.0, -50.0]])
    labels, mask = jnp.array([0.5, 1.0, 1.0]), jnp.array([True, True, False])
    want = (6 * 0.5 * math.log(2) + 0.5 * math.log(2) + math.log(4)) / (6 * 0.5 + 0.5 + 1)
    np.testing.assert_allclose(float(sd.weighted_bce(logits, labels, mask, 6.0)), want, rtol=1e-6)
    # Weight 1 is the plain soft-label BCE.
    plain = -(0.5 * math.log(0.5) * 2 + math.log(0.25)) / 2
    np.testing.assert_allclose(float(sd.weighted_bce(logits, labels, mask, 1.0)), plain, rtol=1e-6)


def test_head_is_residual_blocks_then_two_logits():
    head = sd.init_head(8, 3, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 8))
    h = x
    for i in range(3):
        h = h + jax.nn.silu(h @ head[f"block_{i}"]["kernel"] + head[f"block_{i}"]["bias"])
    want = h @ head["out"]["kernel"] + head["out"]["bias"]
    np.testing.assert_allclose(np.asarray(sd.head_logits(head, x)), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sd.reject_prob(head, x)), np.asarray(jax.nn.softmax(want)[:, 0]),
                               rtol=1e-5, atol=1e-6)


def test_auc_by_hand():
    from spec_jax.training.acceptance_recipe import auc

    score, positive = np.array([0.9, 0.4, 0.4, 0.1]), np.array([True, True, False, False])
    assert auc(score, positive) == (1 + 1 + 0.5 + 1) / 4  # pairs (0.9, 0.4), (0.9, 0.1), (0.4, 0.4), (0.4, 0.1)
    assert math.isnan(auc(score, np.ones(4, bool)))


# ----------------------------------------------------------------------------- greedy exactness


@pytest.mark.parametrize("threshold,min_k,max_k", [(0.3, 2, 6), (0.05, 1, 4)])
def test_specdecpp_greedy_exact_batched_and_single(tiny, prompts, threshold, min_k, max_k):
    params, cfg = tiny
    ar = generate(Engine(cfg), params, prompts, 24).token_ids
    for draft, dcfg in (truncate(params, cfg, 2), (params, cfg)):  # a weak draft and a perfect one
        drafter = sd.SpecDecPP(draft_cfg=dcfg, policy=FixedLength(max_k), threshold=threshold, min_k=min_k)
        weights = {"draft": draft, "head": sd.init_head(cfg.hidden_size, 3, jax.random.key(1))}
        assert generate(Engine(cfg, drafter), params, prompts, 24, weights=weights).token_ids == ar
        assert generate(Engine(cfg, drafter), params, prompts[1:2], 24, weights=weights).token_ids == ar[1:2]


def test_specdecpp_refuses_bad_settings(tiny):
    params, cfg = tiny
    draft, dcfg = truncate(params, cfg, 1)
    with pytest.raises(InvalidArgumentError, match="min K <= max K"):
        sd.SpecDecPP(draft_cfg=dcfg, policy=FixedLength(2), min_k=3)
    with pytest.raises(InvalidArgumentError, match="threshold"):
        sd.SpecDecPP(draft_cfg=dcfg, threshold=1.0)
    drafter = sd.SpecDecPP(draft_cfg=dcfg, policy=FixedLength(4))
    with pytest.raises(DataFormatError, match="hidden size 64"):
        drafter.check(cfg, {"draft": draft, "head": sd.init_head(32, 3, jax.random.key(0))}, None)


# ----------------------------------------------------------------------------- Thompson sampling


def test_thompson_update_and_limits():
    policy = ThompsonLength(k=6, seed=3)
    state = policy.init(3)
    new = policy.update(state, jnp.array([4, 1, 2]), jnp.array([4, 6, 5]), jnp.array([True, True, False]))
    # Sequence 0 accepted all 4 (4 successes, no failure); 1 accepted 1 of 6 (1 success, 1 failure); 2 inactive.
    np.testing.assert_array_equal(np.asarray(new["alpha"]), [5.0, 2.0, 1.0])
    np.testing.assert_array_equal(np.asarray(new["beta"]), [1.0, 2.0, 1.0])
    assert not np.array_equal(np.asarray(new["key_B"]), np.asarray(state["key_B"]))  # fresh draws next step
    limits = np.asarray(policy.limit(state))
    assert limits.dtype == np.int32 and ((1 <= limits) & (limits <= 6)).all()
    sure = {"alpha": jnp.array([1e6, 1e-3]), "beta": jnp.array([1e-3, 1e6]), "key_B": state["key_B"][:2]}
    np.testing.assert_array_equal(np.asarray(policy.limit(sure)), [6, 1])  # theta ~ 1: all k; theta ~ 0: one
    # The length is a Thompson draw: theta ~ Beta(3, 1) has mean run E[min(1 + Geom, k)]; check by simulation.
    many = ThompsonLength(k=6).init(4000) | {"alpha": jnp.full((4000,), 3.0), "beta": jnp.ones((4000,))}
    theta = np.random.default_rng(0).beta(3.0, 1.0, 200_000)
    want = sum(theta ** j for j in range(6))  # E[length] = sum_{j<k} E[theta^j]
    np.testing.assert_allclose(np.asarray(policy.limit(many)).mean(), want.mean(), rtol=0.05)
    with pytest.raises(InvalidArgumentError, match="Beta"):
        ThompsonLength(k=4, alpha=0.0)


def test_thompson_draft_model_greedy_exact(tiny, prompts):
    params, cfg = tiny
    ar = generate(Engine(cfg), params, prompts, 24).token_ids
    for draft, dcfg in (truncate(params, cfg, 2), (params, cfg)):
        drafter = DraftModel(draft_cfg=dcfg, policy=make_policy("thompson", 5))
        assert generate(Engine(cfg, drafter), params, prompts, 24, weights=draft).token_ids == ar
        assert generate(Engine(cfg, drafter), params, prompts[:1], 24, weights=draft).token_ids == ar[:1]


# ----------------------------------------------------------------------------- the recipe

def _recipe(tmp_path, data_dir, name="run", **over):
    from spec_jax.training.recipes import Recipe

    return Recipe.from_mapping({
        "recipe": "specdecpp", "data": str(data_dir), "out": str(tmp_path / "head"), "acc_draft_layers": 1,
        "acc_blocks": 2, "acc_max_k": 4, "eval_rows": 2, "tau_prompts": 2, "tau_tokens": 12, **over,
        "train": {"output_dir": str(tmp_path / name), "total_steps": 12, "batch_size": 32, "learning_rate": 0.01,
                  "checkpoint_every": 4, "eval_every": 6}}, source="test recipe")


def test_specdecpp_recipe_trains_saves_and_decodes(tmp_path, data_dir, target, tiny_hf_dir, capsys):
    from spec_jax.cli import main
    from spec_jax.training import read_records
    from spec_jax.training.recipes import run_recipe

    metrics = run_recipe(_recipe(tmp_path, data_dir), target=target, progress=False)
    assert metrics["steps"] == 12 and metrics["examples"] > 0
    assert math.isnan(metrics["auc_reject"]) or 0 <= metrics["auc_reject"] <= 1  # nan: no accepted token held out
    assert 1 <= metrics["mean_k"] <= 4 and metrics["real_tau"] >= 1.0
    losses = [r["loss"] for r in read_records(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses  # it learns
    saved = json.loads((tmp_path / "head" / "config.json").read_text())
    assert saved["head_type"] == "specdecpp" and saved["num_blocks"] == 2 and saved["draft"]["num_layers"] == 1
    assert saved["draft"]["source"] == "stand-in: 1"
    out = []
    for flags in ([], ["--method", "specdecpp", "--acceptance-head", str(tmp_path / "head"), "--draft-layers", "1",
                       "--max-k", "4"]):
        assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", RECIPE_PROMPTS[0], "--max-new-tokens", "12",
                     "--json", "--no-phase-timing", *flags]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert out[1]["token_ids"] == out[0]["token_ids"]

    # A head is refused for another draft, another model, or as another method's heads, before decoding.
    from spec_jax.drafters import registry

    with pytest.raises(DataFormatError, match="trained for another draft model"):
        registry.build("specdecpp", {"acceptance_head": str(tmp_path / "head"), "draft_layers": 2}, target)
    other = target.cfg.replace(hidden_size=32)
    with pytest.raises(DataFormatError, match="hidden_size 64, this model has 32"):
        sd.load_acceptance_head(tmp_path / "head", other)
    with pytest.raises(InvalidArgumentError, match="--min-k 5 > --max-k 4"):
        registry.validate("specdecpp", {"acceptance_head": str(tmp_path / "head"), "min_k": 5, "max_k": 4},
                          target.cfg)
    with pytest.raises(InvalidArgumentError, match="no such directory"):
        registry.validate("specdecpp", {"acceptance_head": str(tmp_path / "nope"), "draft_layers": 1}, target.cfg)
    medusa_like = tmp_path / "medusa"
    from spec_jax.drafters.head_checkpoints import heads_meta, save_heads

    save_heads(medusa_like, "medusa", {"kernel": np.zeros((1, 2), np.float32)}, heads_meta(target.cfg))
    with pytest.raises(DataFormatError, match="head_type is 'medusa'"):
        registry.validate("specdecpp", {"acceptance_head": str(medusa_like), "draft_layers": 1}, target.cfg)


def test_specdecpp_recipe_resumes_exactly(tmp_path, data_dir, target):
    """A run interrupted after its step-4 checkpoint and started again ends with the parameters and losses of
    a run never stopped (the examples come back from the cache, the batches from the step)."""
    from spec_jax.training.acceptance_recipe import specdecpp_parts
    from spec_jax.training.data import TrainingData

    data = TrainingData(data_dir)

    def parts_for(name):
        recipe = _recipe(tmp_path, data_dir, name=name)
        return recipe, specdecpp_parts(recipe, data, len(data) - 2, target, None)

    assert_resume_exact(parts_for, lambda name: tmp_path / name, stop_at=6, resumed_from=4,
                        after_cut=lambda: (tmp_path / "cut" / "acceptance_data.npz").is_file() or pytest.fail(
                            "the interrupted run did not keep its acceptance examples"))
