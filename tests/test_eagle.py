"""EAGLE drafts: training-time test unrolls exactly what drafting computes, the loss against a direct
computation, greedy exactness through the engine (EAGLE-1 and EAGLE-3 features, full and reduced draft
vocabularies, batched and single), `--budget`, the recipe end to end, and refused checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_jax.decoding import Engine, generate
from spec_jax.decoding.budget import apply_budget
from spec_jax.drafters.dynamic_tree import DynamicTree
from spec_jax.drafters.eagle import (
    Eagle,
    draft_rows,
    eagle_loss,
    init_eagle,
    layer_cfg,
    load_eagle,
    readout,
    save_eagle,
    target_features,
    unroll,
)
from spec_jax.drafters.head_checkpoints import heads_meta
from spec_jax.drafters.medusa import init_heads, save_heads
from spec_jax.drafters.vocab import reduced_vocab
from spec_jax.errors import CheckpointError, DataFormatError
from spec_jax.models import final_norm, init_cache, lm_head

TREE = DynamicTree(depth=3, width=3, k=3, budget=8)


def _scaled(params, factor=3.0):
    """A random draft with sharper outputs, so its trees are varied (and now and then accepted)."""
    return jax.tree.map(lambda x: x * factor if x.ndim == 2 else x, params)


def test_unroll_step_j_is_a_drafted_chain(tiny):
    """Row r of training-time-test step j equals the depth-(j+1) node of a chain drafted after committed
    row r - j, fed its parent's output: the attention mask of `unroll` is the one drafting uses."""
    params, cfg = tiny
    eagle = init_eagle(cfg, jax.random.key(1))
    L, E = 10, cfg.hidden_size
    feats = jax.random.normal(jax.random.key(2), (1, L, E))
    tokens = jax.random.randint(jax.random.key(3), (1, L), 0, cfg.vocab_size)
    outs = unroll(eagle, params, cfg, feats, tokens, steps=3)
    for c in (2, 5):  # committed rows 0..c
        cache = init_cache(layer_cfg(cfg), 1, 32)
        out, cache = draft_rows(eagle, params, cfg, feats[:, :c + 1], tokens[:, :c + 1],
                                jnp.arange(c + 1)[None], cache)
        prev = out[:, -1:]
        np.testing.assert_allclose(prev[0, 0], outs[0][0, c], rtol=1e-4, atol=1e-5)
        for j in (1, 2):  # the chain's next rows, each a scratch entry past the committed ones
            r = c + j
            mask = jnp.ones((1, 1, j), bool)  # sees its chain ancestors (earlier scratch rows) and itself
            prev, cache = draft_rows(eagle, params, cfg, prev, tokens[:, r:r + 1], jnp.array([[r]]),
                                     cache.replace(lengths=jnp.array([c + 1])), mask)
            np.testing.assert_allclose(prev[0, 0], outs[j][0, r], rtol=1e-4, atol=1e-5)


def test_loss_against_a_direct_computation(tiny):
    params, cfg = tiny
    eagle = init_eagle(cfg, jax.random.key(1))
    B, L, E = 2, 8, cfg.hidden_size
    hidden = jax.random.normal(jax.random.key(2), (B, L, E))
    tokens = jax.random.randint(jax.random.key(3), (B, L), 0, cfg.vocab_size)
    mask = jnp.asarray(np.arange(L)[None] >= np.array([[2], [4]]))
    batch = {f"hidden_{cfg.num_layers}": hidden, "tokens": tokens, "mask": mask,
             "starts": jnp.array([[1, 3], [2, 5]])}
    loss, aux = eagle_loss(eagle, params, cfg, batch, jax.random.key(0), regression=2.0, soft_ce=0.5, noise=0.0)
    # By hand: features, one draft pass, the target's distribution at r + 1, the masks.
    f = np.asarray(final_norm(params, cfg, hidden))
    out = np.asarray(unroll(eagle, params, cfg, jnp.asarray(f), jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))), 1)[0])
    ce, n, l1, m1 = 0.0, 0, 0.0, 0
    for b in range(B):
        for r in np.asarray(batch["starts"][b]):
            if r + 2 < L and mask[b, r + 2]:
                p = np.asarray(jax.nn.softmax(lm_head(params, cfg, jnp.asarray(f[b, r + 1]))))
                logq = np.asarray(jax.nn.log_softmax(lm_head(params, cfg, jnp.asarray(out[b, r]))))
                ce, n = ce - np.sum(p * logq), n + 1
        for p_ in range(L - 1):
            if mask[b, p_ + 1]:
                d = np.abs(out[b, p_] - f[b, p_ + 1])
                l1, m1 = l1 + np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5)), m1 + 1
    want = 0.5 * ce / n + 2.0 * l1 / m1
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(float(aux["l1"]), l1 / m1, rtol=1e-4)
    assert jax.tree.leaves(jax.grad(lambda p: eagle_loss(p, params, cfg, batch, jax.random.key(0))[0])(eagle))


@pytest.mark.parametrize("layers,vocab", [((), 0), ((1, 2, 4), 0), ((), 64), ((1, 2, 4), 64)],
                         ids=["eagle1", "eagle3", "eagle1-vocab", "eagle3-vocab"])
def test_greedy_exact_batched_and_single(layers, vocab, tiny, prompts):
    params, cfg = tiny
    weights = _scaled(init_eagle(cfg, jax.random.key(1), layers))
    if vocab:
        ranking = np.random.default_rng(0).permutation(cfg.vocab_size)
        weights["vocab"] = reduced_vocab(params, cfg, ranking, vocab)
    engine = Engine(cfg, Eagle(feature_layers=layers, tree=TREE))
    ar = generate(Engine(cfg), params, prompts, 20).token_ids
    g = generate(engine, params, prompts, 20, weights=weights)
    assert g.token_ids == ar
    single = generate(engine, params, [prompts[1]], 20, weights=weights)
    assert single.token_ids[0] == ar[1]
    if vocab:  # every drafted token is a target id of the reduced vocabulary
        from spec_jax.drafters.base import StepContext
        from spec_jax.sampling import Sampling

        n = len(prompts[1])
        tokens = jnp.asarray([prompts[1] + [0] * (64 - n)], jnp.int32)
        ctx = StepContext(params, cfg, init_cache(cfg, 1, 64), tokens, jnp.array([n - 1]), tokens[:, n - 1],
                          Sampling(), jax.random.key(0))
        tree, _, _ = engine.drafter.propose(weights, engine.drafter.init(weights, None, cfg, 1, 64), ctx)
        assert set(np.asarray(tree.tokens).ravel().tolist()) <= set(np.asarray(weights["vocab"]["d2t"]).tolist())


def test_trained_draft_is_accepted_and_exact(tiny, prompts):
    """A draft trained for a few steps on the target's own greedy continuations gets accepted, and stays
    exact: the engine covered accepted paths, not only rejections."""
    import optax

    params, cfg = tiny
    ar = generate(Engine(cfg), params, prompts, 40)
    seqs = [p + t for p, t in zip(prompts, ar.token_ids, strict=True)]
    L = max(map(len, seqs))
    tokens = np.zeros((len(seqs), L), np.int32)
    mask = np.zeros((len(seqs), L), bool)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        tokens[i, :len(s)], mask[i, len(p):len(s)] = s, True
    from spec_jax.models import forward

    out = forward(params, cfg, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(L), tokens.shape),
                  init_cache(cfg, len(seqs), L), compute_logits=False)
    starts = np.stack([np.arange(len(p) - 1, len(p) + 30) for p in prompts]).astype(np.int32)
    batch = {f"hidden_{cfg.num_layers}": out.final_hidden, "tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
             "starts": jnp.asarray(starts)}
    eagle = init_eagle(cfg, jax.random.key(1))
    opt = optax.adam(3e-3)
    state = opt.init(eagle)

    @jax.jit
    def step(eagle, state, rng):
        (loss, aux), g = jax.value_and_grad(eagle_loss, has_aux=True)(eagle, params, cfg, batch, rng, steps=2,
                                                                       soft_ce=1.0)
        updates, state = opt.update(g, state)
        return optax.apply_updates(eagle, updates), state, (loss, aux["top1"][0])

    losses, top1 = [], []
    for i in range(60):
        eagle, state, (loss, acc) = step(eagle, state, jax.random.key(i))
        losses.append(float(loss))
        top1.append(float(acc))
    # The soft cross-entropy is bounded below by the target's entropy (high for a random model): the loss
    # falls, and the draft's top-1 comes to agree with the target's.
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses[::10]
    assert np.mean(top1[-5:]) > 0.5 > np.mean(top1[:5]), top1[::10]
    g = generate(Engine(cfg, Eagle(tree=TREE)), params, prompts, 40, weights=eagle)
    assert g.token_ids == ar.token_ids
    assert g.stats()["tau"] > 1.5, g.stats()


def test_features_fuse_the_named_layers(tiny):
    params, cfg = tiny
    eagle = init_eagle(cfg, jax.random.key(1), (1, 3))
    h = {i: jax.random.normal(jax.random.key(i), (2, cfg.hidden_size)) for i in (1, 3)}
    want = jnp.concatenate([h[1], h[3]], -1) @ eagle["fuse"]["kernel"]
    np.testing.assert_allclose(target_features(eagle, params, cfg, (1, 3), h, None), want, rtol=1e-5)
    normed = readout(eagle, params, cfg, want)
    np.testing.assert_allclose(normed, lm_head(params, cfg, final_norm({"norm": eagle["norm"]}, cfg, want)),
                               rtol=1e-5, atol=1e-5)


def test_budget_keeps_the_best_nodes(tiny, prompts):
    params, cfg = tiny
    weights = _scaled(init_eagle(cfg, jax.random.key(1)))
    engine = Engine(cfg, Eagle(tree=DynamicTree(depth=3, width=3, k=3, budget=12)))
    small, report = apply_budget(engine, 5, params, weights=weights)
    assert small.drafter.shape.nodes == 5 and report == {"nodes": 5}
    ar = generate(Engine(cfg), params, prompts, 12).token_ids
    assert generate(small, params, prompts, 12, weights=weights).token_ids == ar


def test_checkpoint_round_trip_and_refusals(tiny, tmp_path):
    params, cfg = tiny
    eagle = init_eagle(cfg, jax.random.key(1), (1, 2, 4))
    path = save_eagle(tmp_path / "e", eagle, heads_meta(cfg, step=3), (1, 2, 4),
                      ranking_V=np.arange(cfg.vocab_size))
    loaded, layers = load_eagle(path, cfg)
    assert layers == (1, 2, 4)
    half = lambda x: np.asarray(x).astype(np.float16).astype(np.float32)  # noqa: E731 (stored float16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), half(b)), loaded, eagle)
    assert (path / "token_ranking.npy").is_file()
    # Another model's draft; Medusa heads given as EAGLE; a truncated weights file.
    other = cfg.replace(hidden_size=32, head_dim=8)
    save_eagle(tmp_path / "o", init_eagle(other, jax.random.key(0)), heads_meta(other))
    with pytest.raises(DataFormatError, match="hidden_size 32, this model has 64"):
        load_eagle(tmp_path / "o", cfg)
    save_heads(tmp_path / "m", init_heads(cfg, 2), heads_meta(cfg))
    with pytest.raises(DataFormatError, match="head_type is 'medusa', this method needs 'eagle'"):
        load_eagle(tmp_path / "m", cfg)
    config = json.loads((tmp_path / "m" / "config.json").read_text()) | {"head_type": "lookahead"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataFormatError, match="'lookahead', this method needs 'eagle' heads \\(not a head type"):
        load_eagle(tmp_path / "m", cfg)
    weights = path / "heads.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_eagle(path, cfg)


def test_cli_generate_and_refusals(tiny_hf_dir, capsys, tmp_path):
    from spec_jax.cli import main
    from spec_jax.models.registry import load_config

    cfg = load_config(str(tiny_hf_dir))
    base = ["generate", "--model", str(tiny_hf_dir), "--prompt", "Hello there", "--max-new-tokens", "8", "--json",
            "--no-phase-timing"]
    assert main(base) == 0
    ar = json.loads(capsys.readouterr().out)["token_ids"]
    from spec_jax.models.registry import load_model

    tparams, _ = load_model(str(tiny_hf_dir), "float32")
    save_eagle(tmp_path / "e", init_eagle(cfg, jax.random.key(0)), heads_meta(cfg),
               ranking_V=np.random.default_rng(0).permutation(cfg.vocab_size))
    assert main([*base, "--method", "eagle", "--heads", str(tmp_path / "e"), "--draft-vocab", "512",
                 "--budget", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == ar
    del tparams
    save_heads(tmp_path / "m", init_heads(cfg, 2), heads_meta(cfg))
    for flags, msg in [(["--heads", str(tmp_path / "m")], "head_type is 'medusa'"),
                       (["--heads", str(tmp_path / "none")], "no such directory"),
                       (["--draft-vocab", "8"], "--draft-vocab needs trained heads"),
                       (["--heads", str(tmp_path / "e"), "--draft-vocab", "2"], "give at least 4")]:
        assert main([*base, "--method", "eagle", *flags]) == 2, flags
        assert msg in capsys.readouterr().err, flags
