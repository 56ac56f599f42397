"""Medusa draft heads: exact under greedy decoding (untrained and random heads, batched and single, pruned
trees), heads that read the right hidden state and fill the tree by Medusa's convention, the training loss
against a hand computation, and the heads checkpoint (round trip, refusals, the command line)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_jax.cli import main
from spec_jax.decoding import Engine, generate
from spec_jax.decoding.budget import apply_budget, auto_budget
from spec_jax.drafters.base import DraftShape, StepContext
from spec_jax.drafters.medusa import (
    MC_SIM_7B_63,
    MEDUSA_TREES,
    TREE_NAMES,
    Medusa,
    heads_logits,
    heads_meta,
    init_heads,
    load_heads,
    medusa_loss,
    save_heads,
    tree_paths,
)
from spec_jax.errors import CheckpointError, DataFormatError, InvalidArgumentError
from spec_jax.models import Config, forward, head, init_cache
from spec_jax.models.registry import load_config
from spec_jax.sampling import Sampling


def test_shipped_trees():
    assert len(MC_SIM_7B_63) == 63 == len(set(MC_SIM_7B_63))
    for name in TREE_NAMES:
        paths = tree_paths(name, 4)
        drafter = Medusa(num_heads=4, paths=paths)  # each is a tree (TreeTemplate checks the parents)
        assert drafter.shape.nodes == len(paths), name
    assert Medusa(num_heads=1, paths=tree_paths("chain", 1)).shape == DraftShape(nodes=1, depth=1)
    assert Medusa().shape.depth == 4 and Medusa().template.level_sizes == (10, 28, 23, 2)
    assert max(max(p) for p in MC_SIM_7B_63) == 9  # top-10 per head
    with pytest.raises(InvalidArgumentError, match="4 levels deep but there are only 2 heads"):
        Medusa(num_heads=2)


def test_zero_heads_read_out_the_lm_head(tiny):
    params, cfg = tiny
    hidden_BxE = jax.random.normal(jax.random.key(3), (2, cfg.hidden_size))
    logits_BxKxV = heads_logits(init_heads(cfg, 3), params, cfg, hidden_BxE)
    assert logits_BxKxV.shape == (2, 3, cfg.vocab_size)
    base_BxV = head(params, cfg, hidden_BxE[:, None])[:, 0]
    for k in range(3):
        np.testing.assert_allclose(logits_BxKxV[:, k], base_BxV, rtol=1e-5, atol=1e-5)
    random = heads_logits(init_heads(cfg, 3, jax.random.key(1), scale=0.3), params, cfg, hidden_BxE)
    assert not np.allclose(random[:, 0], base_BxV, atol=1e-3)


@pytest.mark.parametrize("scale,tree,num_heads,vocab", [(0.0, "mc_sim_7b_63", 4, 0), (0.3, "sim_16", 4, 0),
                                                         (0.3, "chain", 2, 0), (0.3, "sim_16", 4, 64)],
                         ids=["zero", "random", "random-chain", "random-reduced-vocab"])
def test_greedy_exact_batched_and_single(scale, tree, num_heads, vocab, tiny, prompts):
    from spec_jax.drafters.vocab import reduced_vocab

    params, cfg = tiny
    heads = init_heads(cfg, num_heads, jax.random.key(1), scale=scale)
    if vocab:  # drafts from a quarter of the vocabulary, in a shuffled frequency order
        heads["vocab"] = reduced_vocab(params, cfg, np.random.default_rng(0).permutation(cfg.vocab_size), vocab)
    engine = Engine(cfg, Medusa(num_heads=num_heads, paths=tree_paths(tree, num_heads)))
    ar = generate(Engine(cfg), params, prompts, 24).token_ids
    g = generate(engine, params, prompts, 24, weights=heads)
    assert g.token_ids == ar
    assert sum(g.accepted) > 0  # the tree was accepted somewhere: the exactness above covered accepted paths
    for i, p in enumerate(prompts):
        assert generate(engine, params, [p], 24, weights=heads).token_ids[0] == ar[i]


def test_sampling_runs_with_deterministic_drafts(tiny, prompts):
    params, cfg = tiny
    engine = Engine(cfg, Medusa(num_heads=4, paths=MEDUSA_TREES["sim_8"]), Sampling(temperature=0.8, top_k=20))
    g = generate(engine, params, prompts, 16, weights=init_heads(cfg, 4), seed=3)
    assert [len(t) for t in g.token_ids] == [16, 16, 16]
    assert all(0 <= t < cfg.vocab_size for seq in g.token_ids for t in seq)


def test_hidden_state_is_the_one_that_produced_the_pending_token(tiny, prompts):
    """After prefill and after every step, the state holds the target's last-layer hidden state at the last
    committed token (whose logits gave the pending token), as an uncached forward over the text computes it."""
    params, cfg = tiny
    heads = init_heads(cfg, 4)
    engine = Engine(cfg, Medusa(num_heads=4, paths=MEDUSA_TREES["mc_sim_7b_63"]))
    padded, lens = engine.pad_prompts(prompts)
    size = engine.cache_size(int(lens.max()), 24)
    state = engine.prefill(params, heads, None, padded, lens, 24, 0, size)
    B, W = len(prompts), int(lens.max()) + 24

    @jax.jit
    def last_layer(tokens_BxW):  # causal: what follows a position does not change its hidden state
        positions_BxW = jnp.broadcast_to(jnp.arange(W), (B, W))
        return forward(params, cfg, tokens_BxW, positions_BxW, init_cache(cfg, B, W), compute_logits=False).final_hidden

    for limit in range(0, 8):
        if limit:
            state = engine.run(params, heads, state, limit)
        committed_B = np.asarray(state.cache.lengths)
        expected_BxWxE = np.asarray(last_layer(state.tokens_BxS[:, :W]))
        np.testing.assert_allclose(np.asarray(state.drafter["hidden_BxE"]),
                                   expected_BxWxE[np.arange(B), committed_B - 1], rtol=1e-4, atol=1e-4,
                                   err_msg=f"after step {limit}")
    assert int(np.sum(state.accepted_B)) > 0  # paths longer than the root were taken


def test_propose_fills_depth_d_from_head_d_minus_1(tiny):
    """Medusa's convention: node (r_1, ..., r_d) holds head d-1's rank-r_d token, whatever its parent holds."""
    params, cfg = tiny
    heads = init_heads(cfg, 4, jax.random.key(2), scale=0.5)
    drafter = Medusa(num_heads=4)
    hidden_BxE = jax.random.normal(jax.random.key(4), (2, cfg.hidden_size))
    ctx = StepContext(target_params=params, cfg=cfg, cache=init_cache(cfg, 2, 8), tokens_BxS=jnp.zeros((2, 8), int),
                      committed_B=jnp.array([3, 5]), pending_B=jnp.array([7, 9]), sampling=Sampling(),
                      rng=jax.random.key(0))
    tree, _, _ = drafter.propose(heads, {"hidden_BxE": hidden_BxE}, ctx)
    order_BxKxV = np.argsort(-np.asarray(heads_logits(heads, params, cfg, hidden_BxE)), axis=-1, kind="stable")
    for i, path in enumerate(drafter.template.paths):
        np.testing.assert_array_equal(tree.tokens[:, i], order_BxKxV[:, len(path) - 1, path[-1]], err_msg=str(path))
    assert bool(jnp.all(tree.valid))


def test_budget_prunes_the_tree(tiny, prompts):
    params, cfg = tiny
    heads = init_heads(cfg, 4, jax.random.key(1), scale=0.3)
    engine, report = apply_budget(Engine(cfg, Medusa()), 6, params, weights=heads)
    assert report == {"nodes": 6} and engine.drafter.shape.nodes == 6 and isinstance(engine.drafter, Medusa)
    assert set(engine.drafter.paths) <= set(MC_SIM_7B_63)
    ar = generate(Engine(cfg), params, prompts, 16).token_ids
    assert generate(engine, params, prompts, 16, weights=heads).token_ids == ar
    # --budget auto: calibrated on the heads' acceptance, with verification that costs 2% of a step per token.
    mild = {t: 0.01 * (1 + 0.02 * (t - 1)) for t in range(1, 18)}
    auto, report = auto_budget(Engine(cfg, Medusa(paths=MEDUSA_TREES["sim_16"])), params, prompts, weights=heads,
                               max_new_tokens=16, cost=mild, probes=0, use_cache=False)
    assert 1 <= report["nodes"] < 16 and auto.drafter.shape.nodes == report["nodes"]
    assert generate(auto, params, prompts, 16, weights=heads).token_ids == ar


# ----------------------------------------------------------------------------- the loss

def _loss_model(V=5, E=4):
    """Just what the heads read of a model: a final norm of weight 1 (with eps ~ 0 it keeps any vector of RMS 1)
    and an explicit LM head L [E, V]."""
    cfg = Config(vocab_size=V, hidden_size=E, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                 head_dim=E, rms_norm_eps=1e-12, eos_token_ids=())
    L = np.zeros((E, V), np.float32)
    L[0] = [2.0, 1.0, 0.0, -1.0, 0.5]
    L[1] = [0.0, 0.5, 1.0, 0.0, -0.5]
    return {"norm": {"weight": jnp.ones((E,))}, "lm_head": {"kernel": jnp.asarray(L)}}, cfg, L


_loss = jax.jit(medusa_loss, static_argnums=2)  # as a training step would run it


def test_loss_hand_computed():
    params, cfg, L = _loss_model()
    # One head (zero-initialised: logits = h @ L), three positions: only position 0 has a label (at 0 + 2).
    h = np.array([[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]], np.float32) * 2.0  # RMS 1: the norm keeps them
    tokens = np.array([[4, 4, 3]])
    loss, per_head = _loss(init_heads(cfg, 1), params, cfg, jnp.asarray(h), jnp.asarray(tokens), jnp.ones((1, 3)),
                           weights=[1.0])
    logits = np.array([4.0, 2.0, 0.0, -2.0, 1.0])  # 2 * L[0]: the norm keeps 2e_0 (its RMS is 1)
    expected = np.log(np.exp(logits).sum()) - logits[3]
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(per_head), [expected], rtol=1e-5)

    # Two heads, weights (1, 0.5), the last label masked: head 0 scores positions 0 and 1 against the tokens at
    # 2 and 3 (3 masked out), head 1 scores position 0 against the token at 3 (masked: no label, loss 0).
    h = np.array([[[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2]]], np.float32)
    tokens, mask = np.array([[0, 0, 1, 2]]), np.array([[1, 1, 1, 0]])
    loss, per_head = _loss(init_heads(cfg, 2), params, cfg, jnp.asarray(h), jnp.asarray(tokens), jnp.asarray(mask),
                           weights=[1.0, 0.5])
    head0 = np.log(np.exp(2 * L[0]).sum()) - 2 * L[0][1]  # position 0 (2e_0) against token 1
    np.testing.assert_allclose(np.asarray(per_head), [head0, 0.0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), head0, rtol=1e-5)


def _numpy_loss(heads, L, h_BxTxE, tokens_BxT, mask_BxT, weights, eps=1e-12):
    n = h_BxTxE / np.sqrt(np.mean(h_BxTxE**2, axis=-1, keepdims=True) + eps)
    per_head = []
    for k in range(len(weights)):
        z = n @ heads["kernel"][k] + heads["bias"][k]
        x = n + z / (1 + np.exp(-z))
        logits = x @ L
        total = count = 0.0
        for b in range(h_BxTxE.shape[0]):
            for t in range(h_BxTxE.shape[1] - 2 - k):
                label = tokens_BxT[b, t + 2 + k]
                if mask_BxT[b, t + 2 + k]:
                    lg = logits[b, t].astype(np.float64)
                    total += np.log(np.exp(lg - lg.max()).sum()) + lg.max() - lg[label]
                    count += 1
        per_head.append(total / max(count, 1))
    return float(np.dot(weights, per_head)), per_head


def test_loss_equals_a_numpy_reference_and_has_gradients():
    params, cfg, L = _loss_model()
    rng = np.random.default_rng(0)
    heads = jax.tree.map(np.asarray, init_heads(cfg, 3, jax.random.key(5), scale=0.7))
    h = rng.normal(size=(2, 7, 4)).astype(np.float32)
    tokens, mask = rng.integers(0, 5, size=(2, 7)), rng.random((2, 7)) > 0.3
    loss, per_head = _loss(heads, params, cfg, jnp.asarray(h), jnp.asarray(tokens), jnp.asarray(mask))
    ref, ref_per_head = _numpy_loss(heads, L, h, tokens, mask, [1.0, 0.8, 0.64])
    np.testing.assert_allclose(np.asarray(per_head), ref_per_head, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    grads = jax.jit(jax.grad(lambda hp: medusa_loss(hp, params, cfg, jnp.asarray(h), jnp.asarray(tokens),
                                                    jnp.asarray(mask))[0]))(heads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["kernel"]).sum()) > 0
    with pytest.raises(InvalidArgumentError, match="3 heads need 3 loss weights"):
        medusa_loss(heads, params, cfg, jnp.asarray(h), jnp.asarray(tokens), jnp.asarray(mask), weights=[1.0])


# ----------------------------------------------------------------------------- checkpoints

def test_save_load_round_trip(tiny, tmp_path):
    params, cfg = tiny
    heads = init_heads(cfg, 3, jax.random.key(1), scale=0.2)
    path = save_heads(tmp_path / "heads", heads, heads_meta(cfg, step=7))
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "heads.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config == {"head_type": "medusa", "num_heads": 3, "hidden_size": cfg.hidden_size,
                      "vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers, "step": 7}
    loaded = load_heads(path, cfg)
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(heads[k]))
    save_heads(path, init_heads(cfg, 2), heads_meta(cfg))  # replaces the directory, atomically
    assert load_heads(path, cfg)["kernel"].shape == (2, cfg.hidden_size, cfg.hidden_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads"]  # no temporary left behind
    with pytest.raises(CheckpointError, match="not a draft-heads directory"):
        load_heads(tmp_path / "missing", cfg)
    (path / "heads.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="heads.safetensors: cannot read safetensors"):
        load_heads(path, cfg)


@pytest.mark.parametrize("field,other", [("hidden_size", 32), ("vocab_size", 300), ("num_layers", 2),
                                         ("head_type", "hydra")])
def test_load_refuses_heads_of_another_model(field, other, tiny, tmp_path):
    params, cfg = tiny
    if field == "head_type":
        path = save_heads(tmp_path / "h", init_heads(cfg, 2), heads_meta(cfg))
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "head_type": other}))
        message = r"h/config.json: head_type is 'hydra', this method needs 'medusa' heads"
    else:
        trained_on = cfg.replace(**{field: other})
        path = save_heads(tmp_path / "h", init_heads(trained_on, 2), heads_meta(trained_on))
        message = rf"h/config.json: heads trained for a model with {field} {other}, this model has " \
                  rf"{getattr(cfg, field)}"
    with pytest.raises(DataFormatError, match=message):
        load_heads(path, cfg)


# ----------------------------------------------------------------------------- the command line

def _generate(capsys, model_dir, *flags):
    rc = main(["generate", "--model", str(model_dir), "--prompt", "Count: one two three one two three",
               "--max-new-tokens", "12", "--json", "--no-phase-timing", *flags])
    captured = capsys.readouterr()
    return rc, captured


def test_cli_generate_untrained_and_trained_heads_with_budget(tiny_hf_dir, capsys, tmp_path):
    rc, ar = _generate(capsys, tiny_hf_dir)
    assert rc == 0, ar.err
    rc, out = _generate(capsys, tiny_hf_dir, "--method", "medusa")
    assert rc == 0, out.err
    assert json.loads(out.out)["token_ids"] == json.loads(ar.out)["token_ids"]
    cfg = load_config(tiny_hf_dir)
    heads = save_heads(tmp_path / "heads", init_heads(cfg, 3, jax.random.key(1), scale=0.2), heads_meta(cfg))
    rc, out = _generate(capsys, tiny_hf_dir, "--method", "medusa", "--heads", str(heads), "--medusa-tree", "sim_16",
                        "--budget", "6")
    assert rc == 0, out.err
    result = json.loads(out.out)
    assert result["token_ids"] == json.loads(ar.out)["token_ids"] and result["method"] == "medusa"
    assert result["budget"]["nodes"] == 6


def test_cli_refuses_bad_heads_before_loading(tiny_hf_dir, capsys, tmp_path):
    rc, out = _generate(capsys, tiny_hf_dir, "--method", "medusa", "--heads", str(tmp_path / "nowhere"))
    assert rc == 2 and "--heads" in out.err and "no such directory" in out.err
    cfg = load_config(tiny_hf_dir)
    other = cfg.replace(num_layers=3)
    wrong = save_heads(tmp_path / "wrong", init_heads(other, 4), heads_meta(other))
    rc, out = _generate(capsys, tiny_hf_dir, "--method", "medusa", "--heads", str(wrong))
    assert rc == 2 and "wrong/config.json: heads trained for a model with num_layers 3, this model has 2" in out.err
    two = save_heads(tmp_path / "two", init_heads(cfg, 2), heads_meta(cfg))
    rc, out = _generate(capsys, tiny_hf_dir, "--method", "medusa", "--heads", str(two))
    assert rc == 2 and "--medusa-tree mc_sim_7b_63 is 4 levels deep but there are only 2 heads" in out.err
    rc, out = _generate(capsys, tiny_hf_dir, "--method", "medusa", "--medusa-heads", "3")
    assert rc == 2 and "--medusa-heads 3" in out.err and "(sim_16, sim_8, chain)" in out.err
    assert len(out.err.strip().splitlines()) == 1
