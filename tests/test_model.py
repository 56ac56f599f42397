"""Verification-shaped forwards: T tokens equal T one-token steps; tree branches equal lone decoding."""

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.models import commit, forward, init_cache
from spec_jax.trees import TreeTemplate, with_root

TOL = dict(rtol=1e-5, atol=1e-5)


def _prefill(params, cfg, ids, size=64):
    B, T = ids.shape
    out = forward(params, cfg, ids, jnp.broadcast_to(jnp.arange(T), (B, T)), init_cache(cfg, B, size))
    return out, out.cache.replace(lengths=jnp.full((B,), T, jnp.int32))


def test_block_equals_steps(tiny):
    params, cfg = tiny
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    _, cache = _prefill(params, cfg, ids[:, :4])
    block = forward(params, cfg, ids[:, 4:], 4 + jnp.broadcast_to(jnp.arange(5), (2, 5)), cache).logits
    steps = []
    for t in range(4, 9):
        out = forward(params, cfg, ids[:, t:t + 1], jnp.full((2, 1), t), cache)
        cache = out.cache.replace(lengths=cache.lengths + 1)
        steps.append(out.logits)
    np.testing.assert_allclose(block, jnp.concatenate(steps, 1), **TOL)


def test_jit_equals_eager(tiny):
    params, cfg = tiny
    ids = jax.random.randint(jax.random.key(2), (1, 6), 0, cfg.vocab_size)
    pos = jnp.arange(6)[None]
    eager = forward(params, cfg, ids, pos, init_cache(cfg, 1, 16)).logits
    jitted = jax.jit(forward, static_argnums=1)(params, cfg, ids, pos, init_cache(cfg, 1, 16)).logits
    np.testing.assert_allclose(eager, jitted, **TOL)


def test_tree_branches_match_lone_decoding(tiny):
    params, cfg = tiny
    prompt = jax.random.randint(jax.random.key(3), (1, 5), 0, cfg.vocab_size)
    _, cache = _prefill(params, cfg, prompt)
    template = TreeTemplate.kary((2, 2))
    node_tokens = jax.random.randint(jax.random.key(4), (1, template.num_nodes), 0, cfg.vocab_size)
    tree = template.build(node_tokens)
    root = jnp.asarray([7])
    tokens, positions, mask = with_root(tree, root, cache.lengths)
    tree_logits = forward(params, cfg, tokens, positions, cache, mask).logits
    parents = template.parents
    for i in range(template.num_nodes):
        branch = [i]
        while parents[branch[0]] >= 0:
            branch.insert(0, int(parents[branch[0]]))
        seq = jnp.concatenate([root, node_tokens[0, jnp.asarray(branch)]])[None]
        alone = forward(params, cfg, seq, 5 + jnp.arange(seq.shape[1])[None], cache).logits
        np.testing.assert_allclose(tree_logits[0, i + 1], alone[0, -1], **TOL)


def test_commit_equals_prefill_of_accepted(tiny):
    params, cfg = tiny
    prompt = jax.random.randint(jax.random.key(5), (1, 4), 0, cfg.vocab_size)
    _, cache = _prefill(params, cfg, prompt, size=32)
    template = TreeTemplate.kary((2, 2))
    node_tokens = jax.random.randint(jax.random.key(6), (1, template.num_nodes), 0, cfg.vocab_size)
    tokens, positions, mask = with_root(template.build(node_tokens), jnp.asarray([9]), cache.lengths)
    out = forward(params, cfg, tokens, positions, cache, mask)
    # Accept root -> node 1 (2nd child) -> its 1st child.
    path_nodes = [0, 2, 1 + list(template.paths).index((1, 0))]
    committed = commit(out.cache, jnp.asarray([path_nodes]), jnp.asarray([3]))
    seq = jnp.concatenate([prompt, tokens[:, jnp.asarray(path_nodes)]], axis=1)
    _, ref = _prefill(params, cfg, seq, size=32)
    assert int(committed.lengths[0]) == 7
    for a, b in zip(committed.k + committed.v, ref.k + ref.v, strict=True):
        np.testing.assert_allclose(a[:, :7], b[:, :7], **TOL)


def test_layer_gates_equal_static_layer_subset(tiny):
    params, cfg = tiny
    ids = jax.random.randint(jax.random.key(2), (2, 6), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    static = forward(params, cfg, ids, pos, init_cache(cfg, 2, 8), layers=(0, 2)).logits
    gates = jnp.array([True, False, True, False])
    gated = forward(params, cfg, ids, pos, init_cache(cfg, 2, 8), layer_gates=gates).logits
    np.testing.assert_allclose(gated, static, **TOL)


def test_tree_mask_over_earlier_scratch_equals_one_block(tiny):
    """A tree fed in two calls (the second level sees the first through a [B, T, C] mask) gets the
    logits of the same tree fed at once."""
    params, cfg = tiny
    ids = jax.random.randint(jax.random.key(3), (1, 5), 0, cfg.vocab_size)
    _, cache = _prefill(params, cfg, ids)
    # Level 1: nodes a, b; level 2: c under a, d under b.
    toks = jnp.array([[7, 8, 9, 10]])
    parents = np.array([-1, -1, 0, 1])
    from spec_jax.trees import ancestor_mask

    full_mask = jnp.asarray(ancestor_mask(parents))[None]
    pos = 5 + jnp.array([[0, 0, 1, 1]])
    whole = forward(params, cfg, toks, pos, cache, full_mask).logits
    first = forward(params, cfg, toks[:, :2], pos[:, :2], cache, full_mask[:, :2, :2])
    second = forward(params, cfg, toks[:, 2:], pos[:, 2:], first.cache, full_mask[:, 2:, :]).logits
    np.testing.assert_allclose(jnp.concatenate([first.logits, second], 1), whole, **TOL)


def test_pieces_for_draft_heads(tiny):
    """What draft heads build on: a forward from input embeddings equals the forward from token ids; the
    pre-norm final hidden state through the final norm and the LM head gives the logits; tied and untied."""
    from spec_jax.models import embed, final_norm, forward_embeddings, head, init_params, lm_head

    params, cfg = tiny
    for c, p in [(cfg, params), (cfg.replace(tie_word_embeddings=True), None)]:
        p = p if p is not None else init_params(c, jax.random.key(2))
        ids = jax.random.randint(jax.random.key(3), (2, 6), 0, c.vocab_size)
        pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
        ref = forward(p, c, ids, pos, init_cache(c, 2, 16), return_hidden=(c.num_layers,))
        emb = forward_embeddings(p, c, embed(p, c, ids), pos, init_cache(c, 2, 16))
        np.testing.assert_allclose(emb.logits, ref.logits, **TOL)
        np.testing.assert_allclose(ref.final_hidden, ref.hidden[c.num_layers], **TOL)
        np.testing.assert_allclose(lm_head(p, c, final_norm(p, c, ref.final_hidden)), ref.logits, **TOL)
        np.testing.assert_allclose(head(p, c, ref.final_hidden), ref.logits, **TOL)
        # A different input (an EAGLE-style feature) changes the output: the embeddings are really used.
        other = forward_embeddings(p, c, embed(p, c, ids) * 2.0, pos, init_cache(c, 2, 16))
        assert not np.allclose(other.logits, ref.logits, **TOL)
