"""AdaEAGLE's draft-structure predictor: the loss by hand, depth-limited dynamic trees (no deeper than the limit,
the budget spent within it, skipped levels not run), greedy exactness of `eagle` and `draft_tree` with a
predictor (batch 1 and > 1), the `structure` recipe (it learns, resumes exactly), and refused checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RECIPE_PROMPTS, assert_resume_exact

from spec_jax.decoding import Engine, generate
from spec_jax.drafters import structure as st
from spec_jax.drafters.draft_model import DraftModelTree
from spec_jax.drafters.dynamic_tree import DynamicTree, draft_dynamic_tree
from spec_jax.drafters.eagle import Eagle, init_eagle, save_eagle
from spec_jax.drafters.head_checkpoints import heads_meta
from spec_jax.errors import InvalidArgumentError
from spec_jax.models import truncate
from spec_jax.sampling import Sampling

TREE = DynamicTree(depth=4, width=3, k=3, budget=10)


def _constant(inputs: int, value: float) -> dict:
    """A predictor that always says `value`."""
    params = st.init_structure(inputs, 8, jax.random.key(0))
    params["fc2"]["kernel"] = jnp.zeros_like(params["fc2"]["kernel"])
    params["fc2"]["bias"] = jnp.full((1,), value, jnp.float32)
    return params


def _varied(inputs: int, seed: int = 0) -> dict:
    """A random predictor whose counts spread over about 0..3 (so depths differ across steps and sequences)."""
    params = st.init_structure(inputs, 16, jax.random.key(seed))
    params["fc2"]["kernel"] = params["fc2"]["kernel"] * 3.0
    params["fc2"]["bias"] = jnp.full((1,), 1.5, jnp.float32)
    return params


def test_loss_against_a_hand_computed_value():
    params = {"fc1": {"kernel": jnp.array([[1.0, -1.0], [0.5, 2.0]]), "bias": jnp.array([0.0, 1.0])},
              "fc2": {"kernel": jnp.array([[2.0], [-1.0]]), "bias": jnp.array([0.5])}}
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0]])
    labels = jnp.array([2.0, 0.0, 1.0])
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    h = silu(np.array([[1.0, 0.0], [0.5, 3.0], [0.0, 6.0]]))  # x @ W1 + b1
    pred = h @ np.array([2.0, -1.0]) + 0.5
    loss, aux = st.structure_loss(params, {"inputs": x, "labels": labels})
    np.testing.assert_allclose(float(loss), np.mean((pred - [2.0, 0.0, 1.0]) ** 2), rtol=1e-6)
    np.testing.assert_allclose(float(aux["mae"]), np.mean(np.abs(pred - [2.0, 0.0, 1.0])), rtol=1e-6)
    np.testing.assert_allclose(float(aux["exact"]), np.mean(np.round(pred) == [2.0, 0.0, 1.0]), rtol=1e-6)
    # Labels: the run of hits from the first step, valid steps only.
    hits = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], bool)
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    assert st.chain_labels(hits, valid).tolist() == [2, 0, 2]
    assert np.asarray(st.depth_limit(jnp.array([-0.7, 0.4, 1.6, 9.0]), 1, 4)).tolist() == [1, 1, 3, 4]


def _toy_step(V=16, calls=None):
    """A drafting model whose logits depend on the fed tokens and depths; `calls` counts executed levels."""
    table = jax.random.normal(jax.random.key(5), (V, V)) * 3

    def tree_step(carry, tokens_BxW, positions_BxW, mask, parent_slots):
        if calls is not None:
            jax.debug.callback(lambda: calls.append(1))
        logits = table[tokens_BxW] + positions_BxW[..., None] * 0.1
        return logits, jnp.concatenate([carry, tokens_BxW], axis=1)  # a carry that grows by W per level

    return tree_step, table


@pytest.mark.parametrize("sampled", [False, True], ids=["topk", "sampled"])
def test_depth_limit_caps_the_tree_and_keeps_the_budget_within_it(sampled):
    spec = DynamicTree(depth=4, width=2, k=3, budget=9, sampled=sampled)
    tree_step, table = _toy_step()
    B, V = 4, 16
    root = jax.random.normal(jax.random.key(1), (B, V)) * 3
    carry = jnp.zeros((B, 0), jnp.int32)
    grow = jax.jit(lambda limit: draft_dynamic_tree(tree_step, carry, root, jnp.zeros((B,), jnp.int32), spec,
                                                    Sampling(1.0) if sampled else Sampling(), jax.random.key(2),
                                                    limit))
    full, _, _ = draft_dynamic_tree(tree_step, carry, root, jnp.zeros((B,), jnp.int32), spec,
                                    Sampling(1.0) if sampled else Sampling(), jax.random.key(2))
    limit = jnp.array([1, 2, 4, 3])
    tree, _, out_carry = grow(limit)
    assert out_carry.shape == (B, spec.num_fed)
    valid, depth = np.asarray(tree.valid), np.asarray(tree.depth)
    for b, d in enumerate(np.asarray(limit)):
        assert depth[b][valid[b]].max() == d  # no deeper than the limit, and as deep
        if sampled:  # the whole expansion up to the limit, the same nodes as without a limit
            np.testing.assert_array_equal(valid[b], np.asarray(full.depth)[b] <= d)
            np.testing.assert_array_equal(np.asarray(tree.tokens)[b], np.asarray(full.tokens)[b])
        else:  # the budget goes to allowed nodes: all of them when fewer, else `budget`, closed under ancestors
            n_allowed = spec.k + (d - 1) * spec.width * spec.k
            assert valid[b].sum() == min(spec.budget, n_allowed)
            parents = np.asarray(tree.parents)[b]
            assert all(p < 0 or valid[b][p] for p in parents[valid[b]])
    # Unlimited equals a limit at the static depth.
    same, _, _ = grow(jnp.full((B,), spec.depth))
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(full), strict=True):  # q rows: jit vs eager
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_levels_no_sequence_needs_are_not_run():
    spec = DynamicTree(depth=4, width=2, k=3, budget=9)
    calls = []
    tree_step, _ = _toy_step(calls=calls)
    B = 3
    root = jax.random.normal(jax.random.key(1), (B, 16))
    grow = jax.jit(lambda limit: draft_dynamic_tree(tree_step, jnp.zeros((B, 0), jnp.int32), root,
                                                    jnp.zeros((B,), jnp.int32), spec, Sampling(), jax.random.key(2),
                                                    limit)[0].valid)
    for limit, levels in (([1, 1, 1], 0), ([1, 2, 1], 1), ([3, 1, 2], 2), ([1, 4, 1], 3)):
        calls.clear()
        jax.block_until_ready(grow(jnp.array(limit)))
        jax.effects_barrier()
        assert len(calls) == levels, (limit, calls)


def _limited_propose(engine, weights, cfg, params, prompt):
    from spec_jax.drafters.base import StepContext
    from spec_jax.models import init_cache

    n = len(prompt)
    tokens = jnp.asarray([prompt + [0] * (64 - n)], jnp.int32)
    ctx = StepContext(params, cfg, init_cache(cfg, 1, 64), tokens, jnp.array([n - 1]), tokens[:, n - 1], Sampling(),
                      jax.random.key(0))
    tree, _, _ = engine.drafter.propose(weights, engine.drafter.init(weights, None, cfg, 1, 64), ctx)
    return np.asarray(tree.depth)[np.asarray(tree.valid)]


def _drafters(tiny):
    params, cfg = tiny
    E = cfg.hidden_size
    eagle = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, init_eagle(cfg, jax.random.key(1)))
    dparams, dcfg = truncate(params, cfg, 1)
    return {"eagle": (lambda s: Eagle(tree=TREE, structure=s), eagle, st.input_size(E, E)),
            "draft_tree": (lambda s: DraftModelTree(draft_cfg=dcfg, tree=TREE, structure=s), dparams,
                           st.input_size(dcfg.hidden_size, dcfg.hidden_size))}


@pytest.mark.parametrize("method", ["eagle", "draft_tree"])
def test_greedy_exact_with_a_predictor_batched_and_single(method, tiny, prompts):
    params, cfg = tiny
    make, weights, inputs = _drafters(tiny)[method]
    ar = generate(Engine(cfg), params, prompts, 20).token_ids
    engine = Engine(cfg, make(st.Structure(margin=0)))
    for d in (1, 2, 3):  # a constant prediction d (margin 0): trees no deeper than d
        w = {**weights, st.HEAD_TYPE: _constant(inputs, float(d))}
        depths = _limited_propose(engine, w, cfg, params, prompts[1])
        assert depths.max() <= d and (d > 1 or depths.tolist() == [1] * TREE.k)  # depth 1: the k root children
    assert generate(engine, params, prompts, 20, weights=w).token_ids == ar
    engine = Engine(cfg, make(st.Structure(margin=1)))
    w = {**weights, st.HEAD_TYPE: _varied(inputs)}
    assert generate(engine, params, prompts, 20, weights=w).token_ids == ar
    assert generate(engine, params, [prompts[2]], 20, weights=w).token_ids[0] == ar[2]
    with pytest.raises(InvalidArgumentError, match="reads 9 inputs"):
        engine.drafter.check(cfg, {**weights, st.HEAD_TYPE: _constant(9, 1.0)}, None)


def test_a_drafter_fingerprint_is_the_same_in_float32_and_bfloat16():
    """A predictor shipped for a draft is found whichever dtype the draft loads in (GPU and TPU users load
    bfloat16), and a different draft gives another fingerprint."""
    from spec_jax.drafters.head_checkpoints import weights_fingerprint

    w32 = {"layer": {"kernel": jax.random.normal(jax.random.key(0), (64, 300))}, "norm": jnp.ones(64)}
    w16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), w32)
    assert weights_fingerprint(w32) == weights_fingerprint(w16)
    other = {**w32, "layer": {"kernel": w32["layer"]["kernel"].at[0, 0].add(1.0)}}
    assert weights_fingerprint(other) != weights_fingerprint(w32)


def test_checkpoints_record_their_draft_and_refuse_another(tiny, tmp_path):
    from spec_jax.drafters.registry import Target, build

    params, cfg = tiny
    E = cfg.hidden_size
    eagle_dir = save_eagle(tmp_path / "eagle", init_eagle(cfg, jax.random.key(1)), heads_meta(cfg))
    target = Target(params=params, cfg=cfg)
    base = build("eagle", {"heads": str(eagle_dir), "structure_head": st.OFF}, target)
    assert base.drafter.structure is None
    fingerprint = st.drafter_fingerprint(base.weights)
    head = _varied(st.input_size(E, E))
    path = st.save_structure(tmp_path / "s", head, heads_meta(cfg), "eagle", fingerprint, 4)
    config = json.loads((path / "config.json").read_text())
    assert config["head_type"] == "structure" and config["drafter"] == "eagle" and config["max_depth"] == 4
    built = build("eagle", {"heads": str(eagle_dir), "structure_head": str(path), "structure_margin": 2}, target)
    assert built.drafter.structure == st.Structure(margin=2)
    half = lambda x: np.asarray(x).astype(np.float16).astype(np.float32)  # noqa: E731 (stored float16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), half(b)), built.weights["structure"], head)
    # Another EAGLE draft; the other method; a predictor given as EAGLE heads; not a directory.
    other = save_eagle(tmp_path / "other", init_eagle(cfg, jax.random.key(2)), heads_meta(cfg))
    with pytest.raises(InvalidArgumentError, match="trained on another eagle draft"):
        build("eagle", {"heads": str(other), "structure_head": str(path)}, target)
    with pytest.raises(InvalidArgumentError, match="trained for --method eagle, not draft_tree"):
        build("draft_tree", {"draft_layers": 1, "structure_head": str(path)}, target)
    with pytest.raises(Exception, match="head_type is 'structure'"):
        build("eagle", {"heads": str(path)}, target)
    with pytest.raises(InvalidArgumentError, match="no such directory"):
        build("eagle", {"heads": str(eagle_dir), "structure_head": str(tmp_path / "missing")}, target)
    with pytest.raises(InvalidArgumentError, match="structure predictor is for one of"):
        st.save_structure(tmp_path / "bad", head, heads_meta(cfg), "medusa", fingerprint, 4)


# ----------------------------------------------------------------------------- the recipe on a tiny model

def _recipe(tmp_path, data_dir, method, draft, **train):
    from spec_jax.training.recipes import Recipe

    return Recipe.from_mapping({
        "recipe": "structure", "data": str(data_dir), "out": str(tmp_path / "structure"),
        "structure_method": method, "structure_draft": draft, "structure_depth": 3, "structure_hidden": 16,
        "starts_per_row": 6, "eval_rows": 2, "tau_prompts": 2, "tau_tokens": 12, "tau_depth": 3, "tau_budget": 6,
        "train": {"output_dir": str(tmp_path / "run"), "total_steps": 12, "batch_size": 8, "learning_rate": 0.02,
                  "checkpoint_every": 6, "eval_every": 6, **train}}, source="test recipe")


def _draft(tmp_path, target, method) -> str:
    """A draft for the tiny target: random EAGLE heads, or its first layer as an HF draft model."""
    from spec_jax.models.loading import export_hf

    if method == "eagle":
        return str(save_eagle(tmp_path / "eagle", init_eagle(target.cfg, jax.random.key(1)), heads_meta(target.cfg)))
    return str(export_hf(*truncate(target.params, target.cfg, 1), tmp_path / "draft", tokenizer=target.tokenizer))


@pytest.mark.parametrize("method", ["eagle", "draft_tree"])
def test_recipe_learns_saves_and_decodes(method, tmp_path, data_dir, target, tiny_hf_dir, capsys):
    from spec_jax.cli import main
    from spec_jax.training import read_records
    from spec_jax.training.recipes import run_recipe

    draft = _draft(tmp_path, target, method)
    metrics = run_recipe(_recipe(tmp_path, data_dir, method, draft), target=target, progress=False)
    assert metrics["steps"] == 12 and metrics["real_tau"] >= 1.0 and 1 <= metrics["mean_depth"] <= 3
    assert metrics["rows"] > 0 and 0 <= metrics["label_mean"] <= 3
    losses = [r["loss"] for r in read_records(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses  # it learns
    saved = json.loads((tmp_path / "structure" / "config.json").read_text())
    assert saved["head_type"] == "structure" and saved["drafter"] == method and saved["max_depth"] == 3
    flags = ["--method", method, "--tree-depth", "3", "--tree-budget", "6"]
    flags += ["--heads" if method == "eagle" else "--draft-model", draft]
    out = []
    for extra in ([], flags, [*flags, "--structure-head", str(tmp_path / "structure")]):
        assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", RECIPE_PROMPTS[0], "--max-new-tokens", "12",
                     "--json", "--no-phase-timing", *extra]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert out[2]["token_ids"] == out[1]["token_ids"] == out[0]["token_ids"]


def test_recipe_resumes_exactly(tmp_path, data_dir, target):
    from spec_jax.training.data import TrainingData
    from spec_jax.training.structure_recipe import structure_parts

    data = TrainingData(data_dir)
    draft = _draft(tmp_path, target, "draft_tree")

    def parts_for(name):
        recipe = _recipe(tmp_path / name, data_dir, "draft_tree", draft)
        return recipe, structure_parts(recipe, data, len(data) - recipe.eval_rows, target, None)

    assert_resume_exact(parts_for, lambda name: tmp_path / name / "run", stop_at=8, resumed_from=6)
