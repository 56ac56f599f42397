"""Hydra draft heads: sequential dependence (each node drafted from its own branch), exact under greedy decoding
(batched and single, with and without the prefix layer, a reduced vocabulary, a pruned tree), the sampling law,
the prefix layer's cache tracking the uncached layer, the losses against hand and NumPy computations and under
an optimiser, the simulated acceptance, and the heads checkpoint (round trip, refusals through the registry)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_lossless_sampling import _assert_matches

from spec_jax import sampling as sp
from spec_jax.decoding import Engine, generate
from spec_jax.decoding.budget import apply_budget
from spec_jax.drafters import registry
from spec_jax.drafters.base import DraftShape, StepContext
from spec_jax.drafters.hydra import (
    Hydra,
    _levels,
    head_logits,
    heads_meta,
    hydra_acceptance,
    hydra_loss,
    init_heads,
    load_heads,
    prefix_config,
    prefix_hidden,
    save_heads,
    tree_paths,
)
from spec_jax.drafters.medusa import MEDUSA_TREES, TREE_NAMES
from spec_jax.drafters.medusa import init_heads as medusa_heads
from spec_jax.drafters.medusa import save_heads as save_medusa_heads
from spec_jax.drafters.registry import Target
from spec_jax.drafters.vocab import reduced_vocab
from spec_jax.errors import CheckpointError, DataFormatError, InvalidArgumentError
from spec_jax.models import Config, embed, final_norm, forward, head, init_cache, init_params
from spec_jax.sampling import Sampling


def test_trees_and_levels():
    for name in TREE_NAMES:
        paths = tree_paths(name, 4)
        assert Hydra(num_heads=4, paths=paths).shape.nodes == len(paths), name
    assert Hydra().shape == DraftShape(nodes=16, depth=3)
    assert Hydra(num_heads=1, paths=tree_paths("chain", 1)).shape == DraftShape(nodes=1, depth=1)
    with pytest.raises(InvalidArgumentError, match="4 levels deep but there are only 2 heads"):
        Hydra(num_heads=2, paths=MEDUSA_TREES["mc_sim_7b_63"])
    # One head readout per node with children (the root included): the drafting cost the option help quotes.
    assert [len(lv.paths_MxJ) for lv in _levels(Hydra().template.paths)] == [1, 3, 1]
    assert sum(len(lv.paths_MxJ) for lv in _levels(Hydra(paths=MEDUSA_TREES["mc_sim_7b_63"]).template.paths)) == 22
    level = _levels(Hydra().template.paths)[2]  # depth 3 of sim_16: (0, 0, 0) and (0, 0, 1) under (0, 0)
    assert level.paths_MxJ.tolist() == [[0, 6]] and level.rank_n.tolist() == [0, 1] and level.top == 2


def test_untrained_heads_read_out_the_lm_head(tiny):
    params, cfg = tiny
    heads = init_heads(cfg, 3, prefix_layer=True)

    @jax.jit
    def outputs(hidden_BxE, h_BxTxE):
        normed_BxE = final_norm(params, cfg, hidden_BxE)
        logits = [head_logits(heads[f"head_{k}"], params, cfg, normed_BxE,  # whatever tokens each head is fed
                              embed(params, cfg, jax.random.randint(jax.random.key(k), (2, k + 1), 0, 256)))
                  for k in range(3)]
        positions_BxT = jnp.broadcast_to(jnp.arange(5), (2, 5))
        prefix_BxTxE = prefix_hidden(heads["prefix"], cfg, h_BxTxE, positions_BxT, init_cache(prefix_config(cfg), 2, 8))
        return head(params, cfg, hidden_BxE), logits, prefix_BxTxE[0]

    hidden_BxE = jax.random.normal(jax.random.key(3), (2, cfg.hidden_size))
    h_BxTxE = jax.random.normal(jax.random.key(4), (2, 5, cfg.hidden_size))
    base_BxV, logits, prefix_BxTxE = outputs(hidden_BxE, h_BxTxE)
    for k in range(3):
        np.testing.assert_allclose(logits[k], base_BxV, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prefix_BxTxE, h_BxTxE, rtol=1e-6, atol=1e-6)  # the prefix layer starts as the identity


@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "reduced-vocab"])
def test_propose_drafts_each_node_from_its_own_branch(reduced, tiny):
    """Node (r_1, ..., r_d) holds the rank-r_d token of head d-1 fed [norm(h), E(pending), E(its parent's
    path tokens)]: children of different parents at one depth differ, unlike Medusa's."""
    params, cfg = tiny
    # Embeddings as large as the normed state (the tiny model's are ~0.02), so that the tokens matter.
    params = {**params, "embed_tokens": {"embedding": 50 * params["embed_tokens"]["embedding"]}}
    heads = init_heads(cfg, 3, jax.random.key(2), scale=0.5)
    vocab = reduced_vocab(params, cfg, np.random.default_rng(1).permutation(cfg.vocab_size), 64) if reduced else None
    weights = heads if vocab is None else {**heads, "vocab": vocab}
    drafter = Hydra(num_heads=3, paths=MEDUSA_TREES["mc_sim_7b_63"][:30])
    drafter.check(cfg, weights, None)
    hidden_BxE = jax.random.normal(jax.random.key(4), (2, cfg.hidden_size))
    pending_B = jnp.array([7, 9])
    ctx = StepContext(target_params=params, cfg=cfg, cache=init_cache(cfg, 2, 8), tokens_BxS=jnp.zeros((2, 8), int),
                      committed_B=jnp.array([3, 5]), pending_B=pending_B, sampling=Sampling(), rng=jax.random.key(0))
    tree = jax.jit(lambda w, h: drafter.propose(w, {"hidden_BxE": h}, ctx)[0])(weights, hidden_BxE)
    tokens_BxN = np.asarray(tree.tokens)
    normed_BxE = final_norm(params, cfg, hidden_BxE)
    paths = drafter.template.paths
    reference = jax.jit(lambda k, branch: head_logits(heads[f"head_{k}"], params, cfg, normed_BxE,
                                                      embed(params, cfg, branch), vocab), static_argnums=0)
    for i, path in enumerate(paths):
        branch_BxJ = np.stack([pending_B] + [tokens_BxN[:, paths.index(path[:j])] for j in range(1, len(path))], 1)
        logits = reference(len(path) - 1, branch_BxJ)
        order = np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, path[-1]]
        expected_B = order if vocab is None else np.asarray(vocab["d2t"])[order]
        np.testing.assert_array_equal(tokens_BxN[:, i], expected_B, err_msg=str(path))
    # Sequential dependence: the top children of (0,) and (1,) are drafted from different branches.
    assert np.any(tokens_BxN[:, paths.index((0, 0))] != tokens_BxN[:, paths.index((1, 0))])
    assert bool(jnp.all(tree.valid))


# ----------------------------------------------------------------------------- through the engine

def _variant(name, params, cfg):
    """(drafter, weights) of a greedy-exactness variant: random non-zero heads, so that drafts vary, small
    enough that some are accepted on the tiny model."""
    if name == "two-layer-pruned":
        drafter = Hydra(num_heads=4, head_layers=2, paths=MEDUSA_TREES["mc_sim_7b_63"]).pruned(10)
        return drafter, init_heads(cfg, 4, jax.random.key(1), head_layers=2, scale=0.05)
    heads = init_heads(cfg, 3, jax.random.key(1), prefix_layer=True, scale=0.3)
    vocab = reduced_vocab(params, cfg, np.random.default_rng(2).permutation(cfg.vocab_size), 128)
    return Hydra(num_heads=3, prefix_layer=True), {**heads, "vocab": vocab}


@pytest.mark.parametrize("variant,single", [("two-layer-pruned", True), ("prefix-reduced-vocab", False)])
def test_greedy_exact(variant, single, tiny, prompts):
    """Batched (sequences finishing at different steps leave the batch inactive) and, without the prefix layer,
    one prompt at a time."""
    params, cfg = tiny
    drafter, weights = _variant(variant, params, cfg)
    engine = Engine(cfg, drafter)
    ar = generate(Engine(cfg), params, prompts, 24).token_ids
    g = generate(engine, params, prompts, 24, weights=weights)
    assert g.token_ids == ar
    assert sum(g.accepted) > 0  # the tree was accepted somewhere: the exactness above covered accepted paths
    for i, p in enumerate(prompts if single else []):
        assert generate(engine, params, [p], 24, weights=weights).token_ids[0] == ar[i]


def test_budget_prunes_the_tree(tiny):
    params, cfg = tiny
    drafter, weights = _variant("prefix-reduced-vocab", params, cfg)
    engine, report = apply_budget(Engine(cfg, drafter), 6, params, weights=weights)
    assert report == {"nodes": 6} and engine.drafter.shape.nodes == 6 and isinstance(engine.drafter, Hydra)
    assert set(engine.drafter.paths) <= set(MEDUSA_TREES["sim_16"]) and engine.drafter.prefix_layer


def test_prefix_layer_cache_tracks_the_uncached_layer(tiny, prompts):
    """Before every draft, the heads read the prefix layer's output at the last committed token as the layer
    computes it uncached over the target's hidden states of the whole text (and its cache holds every committed
    position): the accepted path's slots were fed in order, with their positions, nothing else."""
    params, cfg = tiny
    drafter, weights = _variant("prefix-reduced-vocab", params, cfg)
    engine = Engine(cfg, drafter)
    padded, lens = engine.pad_prompts(prompts)
    size = engine.cache_size(int(lens.max()), 24)
    state = engine.prefill(params, weights, None, padded, lens, 24, 0, size)
    B, W = len(prompts), int(lens.max()) + 24
    positions_BxW = jnp.broadcast_to(jnp.arange(W), (B, W))

    @jax.jit
    def uncached(tokens_BxW):
        h = forward(params, cfg, tokens_BxW, positions_BxW, init_cache(cfg, B, W), compute_logits=False).final_hidden
        return prefix_hidden(weights["prefix"], cfg, h, positions_BxW, init_cache(prefix_config(cfg), B, W))[0]

    feed = jax.jit(lambda s: drafter._feed_prefix(weights, s, cfg))
    for limit in range(0, 8):
        if limit:
            state = engine.run(params, weights, state, limit)
        committed_B = np.asarray(state.cache.lengths)
        fed = feed(state.drafter)
        np.testing.assert_array_equal(fed["cache"].lengths, committed_B)
        np.testing.assert_allclose(np.asarray(fed["hidden_BxE"]),
                                   np.asarray(uncached(state.tokens_BxS[:, :W]))[np.arange(B), committed_B - 1],
                                   rtol=1e-4, atol=1e-4, err_msg=f"after step {limit}")
    assert int(np.sum(state.accepted_B)) > 0  # paths longer than the root were fed


def test_sampling_follows_the_target_law():
    """The first three tokens of Hydra++ decoding (random heads, the point-mass rule) follow the target's exact
    sampling law, by test_lossless_sampling's chi-square check (which its broken-verifier test shows failing)."""
    cfg = Config(vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                 head_dim=16, eos_token_ids=())
    params = jax.jit(lambda key: jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x,  # sharper distributions
                                              init_params(cfg, key)))(jax.random.key(3))
    weights = init_heads(cfg, 3, jax.random.key(4), prefix_layer=True, scale=0.5)
    s, prompt, n = sp.Sampling(1.0), [1, 2, 3, 1, 2, 3], 2000
    # The exact law: P(t1) P(t2 | t1) P(t3 | t1, t2) from one forward over every (t1, t2) continuation.
    t12 = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1).reshape(64, 2)
    rows = jnp.asarray(np.concatenate([np.tile(prompt, (64, 1)), t12], 1))
    logits = jax.jit(lambda r: forward(params, cfg, r, jnp.broadcast_to(jnp.arange(8), (64, 8)),
                                       init_cache(cfg, 64, 8)).logits)(rows)
    p = np.asarray(sp.probs(logits[:, 5:8], s), np.float64)  # [64, 3, V]: after the prompt, t1, t2
    law = (p[0, 0][:, None, None] * p[::8, 1][:, :, None] * p[:, 2].reshape(8, 8, 8)).ravel()
    engine = Engine(cfg, Hydra(num_heads=3, prefix_layer=True, paths=MEDUSA_TREES["sim_8"]), s)
    padded, lens = engine.pad_prompts([prompt] * n)
    state = engine.prefill(params, weights, None, padded, lens, 3, 7, engine.cache_size(6, 3))
    state = engine.run(params, weights, state, 1 << 30)
    assert int(np.sum(state.accepted_B)) > n // 4  # drafts were accepted: the law covers accepted paths
    toks = np.asarray(state.tokens_BxS[:, 6:9])
    _assert_matches(np.bincount(toks[:, 0] * 64 + toks[:, 1] * 8 + toks[:, 2], minlength=512), law)


# ----------------------------------------------------------------------------- the loss

def _loss_model(V=5, E=4):
    """Just what the heads read of a model: a final norm of weight 1 (with eps ~ 0 it keeps any vector of RMS 1),
    input embeddings e_v = 2 * one_hot(v mod E) (RMS 1) and an explicit LM head L [E, V]."""
    cfg = Config(vocab_size=V, hidden_size=E, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                 head_dim=E, rms_norm_eps=1e-12, eos_token_ids=())
    L = np.zeros((E, V), np.float32)
    L[0] = [2.0, 1.0, 0.0, -1.0, 0.5]
    L[1] = [0.0, 0.5, 1.0, 0.0, -0.5]
    L[2] = [1.0, 0.0, -1.0, 0.5, 0.0]
    emb = 2.0 * np.eye(E, dtype=np.float32)[np.arange(V) % E]
    target = {"norm": {"weight": jnp.ones((E,))}, "lm_head": {"kernel": jnp.asarray(L)},
              "embed_tokens": {"embedding": jnp.asarray(emb)}}
    return target, cfg, L, emb


_loss = jax.jit(hydra_loss, static_argnums=(2, 8))  # as a training step would run it


def _ce(logits, label):
    return np.log(np.exp(logits).sum()) - logits[label]


def _soft_ce(logits, target_logits):
    p = np.exp(target_logits - target_logits.max())
    p /= p.sum()
    return np.log(np.exp(logits).sum()) - np.dot(p, logits)


def test_loss_hand_computed():
    target, cfg, L, emb = _loss_model()
    E = cfg.hidden_size
    # Hidden states 2 e_j (RMS 1: the norm keeps them). Head 0 reads only the embedding of x_{t+1} (its
    # projection picks the second block), head 1 only that of x_{t+2}: the teacher-forced true tokens.
    h = 2.0 * np.eye(E, dtype=np.float32)[[0, 1, 2, 0, 1]][None]
    tokens = np.array([[4, 1, 2, 3, 0]])  # x_1 = 1, x_2 = 2: head 0 at t=0 reads e_1, head 1 reads e_2
    heads = jax.tree.map(np.array, init_heads(cfg, 2))
    for k in range(2):
        heads[f"head_{k}"]["proj"] = np.zeros(((k + 2) * E, E), np.float32)
        heads[f"head_{k}"]["proj"][(k + 1) * E:] = np.eye(E)
    mask, starts = np.ones((1, 5)), np.array([[0, 2, -1]])  # start 2: head 0 scores x_4, head 1 has no x_5
    args = (heads, target, cfg, jnp.asarray(h), jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(starts))
    head0 = [emb[1] @ L, emb[3] @ L]  # logits at starts 0 and 2 (fed x_1 and x_3)
    head1 = [emb[2] @ L]  # at start 0 (fed x_2)
    # Hard: against x_{t+2+k}.
    loss, per_head = _loss(*args, [1.0, 0.5], False)
    expected = [(_ce(head0[0], 2) + _ce(head0[1], 0)) / 2, _ce(head1[0], 3)]
    np.testing.assert_allclose(np.asarray(per_head), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected[0] + 0.5 * expected[1], rtol=1e-5)
    # Teacher: against softmax of the target's logits at t+1+k (the hidden states 2 e_j there).
    loss, per_head = _loss(*args, [1.0, 0.5], True)
    expected = [(_soft_ce(head0[0], h[0, 1] @ L) + _soft_ce(head0[1], h[0, 3] @ L)) / 2,
                _soft_ce(head1[0], h[0, 2] @ L)]
    np.testing.assert_allclose(np.asarray(per_head), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected[0] + 0.5 * expected[1], rtol=1e-5)
    # The label's mask: masking x_4 leaves head 0 only start 0.
    loss, per_head = _loss(heads, target, cfg, jnp.asarray(h), jnp.asarray(tokens),
                           jnp.asarray([[1, 1, 1, 1, 0]]), jnp.asarray(starts), [1.0, 0.5], False)
    np.testing.assert_allclose(np.asarray(per_head)[0], _ce(head0[0], 2), rtol=1e-5)


def _numpy_loss(heads, emb, L, h_BxLxE, tokens_BxL, mask_BxL, starts_BxW, weights, teacher, eps=1e-12):
    norm = lambda x: x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)  # noqa: E731
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    B, Lr, _ = h_BxLxE.shape
    per_head = []
    for k in range(len(weights)):
        p = heads[f"head_{k}"]
        total = count = 0.0
        for b in range(B):
            for t in starts_BxW[b]:
                if t < 0 or t + 2 + k >= Lr or not mask_BxL[b, t + 2 + k]:
                    continue
                c = np.concatenate([norm(h_BxLxE[b, t])] + [emb[tokens_BxL[b, t + 1 + j]] for j in range(k + 1)])
                x = c @ p["proj"] + silu(c @ p["kernel"] + p["bias"])
                for i in range(p["blocks"]["kernel"].shape[0]):
                    x = x + silu(x @ p["blocks"]["kernel"][i] + p["blocks"]["bias"][i])
                logits = (x @ L).astype(np.float64)
                if teacher:
                    total += _soft_ce(logits, (norm(h_BxLxE[b, t + 1 + k]) @ L).astype(np.float64))
                else:
                    total += _ce(logits, tokens_BxL[b, t + 2 + k])
                count += 1
        per_head.append(total / max(count, 1))
    return float(np.dot(weights, per_head)), per_head


@pytest.mark.parametrize("teacher", [True, False], ids=["teacher", "hard"])
def test_loss_equals_a_numpy_reference_and_has_gradients(teacher):
    target, cfg, L, emb = _loss_model()
    rng = np.random.default_rng(0)
    heads = jax.tree.map(np.asarray, init_heads(cfg, 3, jax.random.key(5), head_layers=2, scale=0.7))
    h = rng.normal(size=(2, 9, 4)).astype(np.float32)
    tokens, mask = rng.integers(0, 5, size=(2, 9)), rng.random((2, 9)) > 0.3
    starts = np.array([[0, 3, 5, -1], [1, 2, 6, 7]])
    loss, per_head = _loss(heads, target, cfg, h, tokens, mask, starts, None, teacher)
    ref, ref_per_head = _numpy_loss(heads, emb, L, h, tokens, mask, starts, [1.0, 0.8, 0.64], teacher)
    np.testing.assert_allclose(np.asarray(per_head), ref_per_head, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    grads = jax.jit(jax.grad(lambda hp: hydra_loss(hp, target, cfg, h, tokens, mask, starts, teacher=teacher)[0]))(
        heads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert all(float(jnp.abs(grads[f"head_{k}"]["kernel"]).sum()) > 0 for k in range(3))
    with pytest.raises(InvalidArgumentError, match="3 heads need 3 loss weights"):
        hydra_loss(heads, target, cfg, h, tokens, mask, starts, weights=[1.0])


def test_loss_with_prefix_layer_runs_it_over_whole_rows(tiny):
    """With a prefix layer the heads read its causal output over the row: the same loss as prefix-free heads
    given that output as the hidden states (hard loss: the teacher reads the target's own states either way)."""
    params, cfg = tiny
    rng = np.random.default_rng(1)
    B, Lr = 2, 12
    h = jnp.asarray(rng.normal(size=(B, Lr, cfg.hidden_size)).astype(np.float32))
    tokens, mask = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, Lr))), jnp.ones((B, Lr), bool)
    starts = jnp.asarray([[0, 4, 7], [2, 5, 9]])
    heads = init_heads(cfg, 2, jax.random.key(3), prefix_layer=True, scale=0.3)
    bare = {k: v for k, v in heads.items() if k != "prefix"}
    out = jax.jit(prefix_hidden, static_argnums=1)(heads["prefix"], cfg, h, jnp.broadcast_to(jnp.arange(Lr), (B, Lr)),
                                                   init_cache(prefix_config(cfg), B, Lr))[0]
    np.testing.assert_allclose(_loss(heads, params, cfg, h, tokens, mask, starts, None, False)[1],
                               _loss(bare, params, cfg, out, tokens, mask, starts, None, False)[1], rtol=1e-5)


def test_teacher_loss_decreases_under_adam(tiny):
    """A few Adam steps on the heads and the prefix layer lower the teacher loss on one batch of a (sharpened)
    target's own hidden states."""
    params, cfg = tiny
    params = jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, params)  # peaked distributions to learn
    rng = np.random.default_rng(2)
    B, Lr = 4, 16
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, Lr)))
    h = jax.jit(lambda t: forward(params, cfg, t, jnp.broadcast_to(jnp.arange(Lr), (B, Lr)), init_cache(cfg, B, Lr),
                                  compute_logits=False).final_hidden)(tokens)
    mask, starts = jnp.arange(Lr)[None] >= 4, jnp.asarray(rng.integers(2, Lr - 2, (B, 6)))
    heads, opt = init_heads(cfg, 3, jax.random.key(0), prefix_layer=True), optax.adam(1e-2)

    @jax.jit
    def step(p, o):
        loss, grads = jax.value_and_grad(lambda q: hydra_loss(q, params, cfg, h, tokens, mask, starts)[0])(p)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    state, losses = opt.init(heads), []
    for _ in range(8):
        heads, state, loss = step(heads, state)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses


def test_acceptance_is_the_greedy_chain_of_the_heads_own_tokens(tiny):
    """`sim_tau` is 1 + the mean run of the chain that feeds each head the previous heads' own top-1 (built here
    token by token, as decoding does): rows whose text follows the chain for r tokens and then leaves it."""
    params, cfg = tiny
    heads = init_heads(cfg, 3, jax.random.key(7), scale=0.3)
    rng = np.random.default_rng(3)
    runs = [0, 1, 2, 3, 1, 0]
    B, Lr = len(runs), 8
    hidden = rng.normal(size=(B, Lr, cfg.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, (B, Lr))
    normed = final_norm(params, cfg, jnp.asarray(hidden[:, 0]))
    fed = [tokens[:, 1]]
    for k in range(3):  # the free-running chain at start 0
        logits = head_logits(heads[f"head_{k}"], params, cfg, normed, embed(params, cfg, np.stack(fed, 1)))
        top1 = np.asarray(jnp.argmax(logits, -1))
        for b, r in enumerate(runs):  # the text follows the chain for r tokens, then differs
            tokens[b, 2 + k] = top1[b] if k < r else (top1[b] + 1) % cfg.vocab_size
        fed.append(top1)
    batch = {"hidden": hidden, "tokens": tokens, "mask": np.ones((B, Lr), bool), "starts": np.array([[0, -1]] * B)}
    got = hydra_acceptance(heads, params, cfg, batch)
    assert got["sim_tau"] == pytest.approx(1 + np.mean(runs))
    assert got["head_top1"][0] == pytest.approx(4 / 6)  # the rows with a run of at least 1


# ----------------------------------------------------------------------------- checkpoints and the registry

def test_save_load_round_trip_and_build(tiny, tmp_path):
    params, cfg = tiny
    heads = init_heads(cfg, 3, jax.random.key(1), head_layers=2, prefix_layer=True, scale=0.2)
    ranking = np.random.default_rng(0).permutation(cfg.vocab_size)
    path = save_heads(tmp_path / "heads", heads, heads_meta(cfg, step=7), ranking)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "heads.safetensors", "token_ranking.npy"]
    config = json.loads((path / "config.json").read_text())
    assert config == {"head_type": "hydra", "num_heads": 3, "head_layers": 2, "prefix_layer": True,
                      "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers,
                      "step": 7}
    loaded = load_heads(path, cfg)
    half = lambda x: np.asarray(x).astype(np.float16).astype(np.float32)  # noqa: E731 (stored float16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), half(b)), loaded, heads)
    built = registry.build("hydra", {"heads": str(path), "hydra_tree": "sim_8", "draft_vocab": 16},
                           Target(params, cfg))
    assert built.drafter == Hydra(num_heads=3, head_layers=2, prefix_layer=True, paths=MEDUSA_TREES["sim_8"])
    assert built.weights["vocab"]["d2t"].shape == (16,)
    built.drafter.check(cfg, built.weights, None)
    untrained = registry.build("hydra", {"hydra_heads": 3, "prefix_layer": True}, Target(params, cfg))
    assert untrained.drafter == Hydra(num_heads=3, prefix_layer=True)  # sim_16 by default
    with pytest.raises(InvalidArgumentError, match="hydra weights do not fit 3 heads of 2 layers with a prefix"):
        built.drafter.check(cfg, untrained.weights, None)


def _hydra_dir(tmp_path, cfg, name="h", **kw):
    return save_heads(tmp_path / name, init_heads(cfg, 4, **kw), heads_meta(cfg))


@pytest.mark.parametrize("field,other", [("hidden_size", 32), ("vocab_size", 300), ("num_layers", 2)])
def test_registry_check_refuses_heads_of_another_model(field, other, tiny, tmp_path):
    params, cfg = tiny
    trained_on = cfg.replace(**{field: other})
    path = _hydra_dir(tmp_path, trained_on, prefix_layer=True)
    message = rf"h/config.json: heads trained for a model with {field} {other}, this model has {getattr(cfg, field)}"
    with pytest.raises(DataFormatError, match=message):
        registry.validate("hydra", {"heads": str(path)}, cfg)
    with pytest.raises(DataFormatError, match=message):
        load_heads(path, cfg)


def test_registry_check_and_load_refuse_bad_checkpoints(tiny, tmp_path):
    params, cfg = tiny
    medusa = save_medusa_heads(tmp_path / "m", medusa_heads(cfg, 4), heads_meta(cfg))
    with pytest.raises(DataFormatError, match="m/config.json: head_type is 'medusa', this method needs 'hydra' "
                                              "heads; use --method medusa"):
        registry.validate("hydra", {"heads": str(medusa)}, cfg)
    with pytest.raises(InvalidArgumentError, match="--heads .*nowhere: no such directory"):
        registry.validate("hydra", {"heads": str(tmp_path / "nowhere")}, cfg)
    two = save_heads(tmp_path / "two", init_heads(cfg, 2), heads_meta(cfg))
    with pytest.raises(InvalidArgumentError, match=r"--hydra-tree sim_16 is 3 levels deep but there are only 2 heads "
                                                   r"\(the 2 heads of --heads .*\(chain\)"):
        registry.validate("hydra", {"heads": str(two)}, cfg)
    with pytest.raises(InvalidArgumentError, match="--draft-vocab needs trained heads"):
        registry.validate("hydra", {"draft_vocab": 16}, cfg)
    # A config that does not match its tensors, and a truncated tensor file: clear errors at load.
    path = _hydra_dir(tmp_path, cfg)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "prefix_layer": True}))
    registry.validate("hydra", {"heads": str(path)}, cfg)  # the config alone is fine
    with pytest.raises(DataFormatError, match="heads.safetensors: its tensors do not match what its config.json "
                                              "declares .*prefix.layers_0"):
        registry.build("hydra", {"heads": str(path)}, Target(params, cfg))
    (path / "config.json").write_text(json.dumps({**config, "head_layers": "two"}))
    with pytest.raises(DataFormatError, match="config.json: head_layers must be a non-negative integer, got 'two'"):
        registry.validate("hydra", {"heads": str(path)}, cfg)
    (path / "config.json").write_text(json.dumps(config))
    data = (path / "heads.safetensors").read_bytes()
    (path / "heads.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="heads.safetensors: cannot read safetensors"):
        registry.build("hydra", {"heads": str(path)}, Target(params, cfg))
