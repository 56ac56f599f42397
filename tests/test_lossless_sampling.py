"""Losslessness under sampling, checked statistically; a deliberately broken verifier must fail.

Verification-level tests use a toy "target" whose next-token distribution depends only on the
previous token (table P2) so the exact joint law of the first two tokens is known:
P(t1, t2) = P1(t1) * P2(t2 | t1). Each of 40,000 independent verifications emits t1 and, when a
child was accepted, t2; otherwise t2 is drawn from P2(. | t1) as the next AR step would.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_jax import sampling as sp
from spec_jax.decoding.verify import verify
from spec_jax.trees import TreeTemplate

verify_mod = importlib.import_module("spec_jax.decoding.verify")

V, N_SAMPLES = 5, 40_000


def _chi2_critical(dof: int, z: float = 3.7) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at p ~ 1e-4."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _assert_matches(counts: np.ndarray, probs: np.ndarray):
    n = counts.sum()
    keep = probs * n >= 5
    expected = probs[keep] * n
    observed = counts[keep]
    rest_e, rest_o = probs[~keep].sum() * n, counts[~keep].sum()
    chi2 = np.sum((observed - expected) ** 2 / expected)
    dof = keep.sum() - 1
    if rest_e > 0:
        chi2 += (rest_o - rest_e) ** 2 / rest_e
        dof += 1
    assert chi2 < _chi2_critical(dof), f"chi2 {chi2:.1f} >= {_chi2_critical(dof):.1f} (dof {dof})"


def _problem(seed, s: sp.Sampling):
    rng = np.random.default_rng(seed)
    logits1 = rng.normal(size=V) * 1.5
    logits2 = rng.normal(size=(V, V)) * 1.5
    q_logits1 = logits1 + rng.normal(size=V)  # a draft close to, but not equal to, the target
    q_logits2 = logits2 + rng.normal(size=(V, V))
    P1 = np.asarray(sp.probs(jnp.asarray(logits1), s))
    P2 = np.asarray(sp.probs(jnp.asarray(logits2), s))
    Q1 = np.asarray(sp.probs(jnp.asarray(q_logits1), s))
    Q2 = np.asarray(sp.probs(jnp.asarray(q_logits2), s))
    return logits1, logits2, P1, P2, Q1, Q2


def _run(template: TreeTemplate, mode: str, s: sp.Sampling, seed=0):
    """Empirical joint counts of (t1, t2) and the exact joint law."""
    logits1, logits2, P1, P2, Q1, Q2 = _problem(seed, s)
    key = jax.random.key(seed)
    k_draft, k_verify, k_next = jax.random.split(key, 3)
    B, N = N_SAMPLES, template.num_nodes
    parents = template.parents
    # Draw node tokens: sampled children are i.i.d. from q at the parent; deterministic children
    # are the parent's top-ranked tokens under q (distinct siblings).
    keys = jax.random.split(k_draft, N)
    tokens = np.zeros((B, N), np.int64)
    qs = np.zeros((B, N, V), np.float32)
    for i in range(N):
        q = Q1[None].repeat(B, 0) if parents[i] < 0 else Q2[tokens[:, parents[i]]]
        if mode == "sampled":
            tokens[:, i] = np.asarray(sp.sample(keys[i], jnp.asarray(q)))
            qs[:, i] = q
        else:
            order = np.argsort(-q, axis=1, kind="stable")
            tokens[:, i] = order[:, template.ranks[i]]
    tree = template.build(jnp.asarray(tokens, jnp.int32), q=jnp.asarray(qs) if mode == "sampled" else None)
    node_logits = logits2[tokens]  # [B, N, V]: the target at a node depends on the node's token
    logits = np.concatenate([np.broadcast_to(logits1, (B, 1, V)), node_logits], 1)
    res = verify(tree, jnp.asarray(logits, jnp.float32), s, k_verify, template.max_depth)
    path, n, nxt = (np.asarray(x) for x in (res.path_BxP, res.num_accepted_B, res.next_token_B))
    inputs = np.concatenate([np.zeros((B, 1), np.int64), tokens], 1)
    t1 = np.where(n >= 1, inputs[np.arange(B), path[:, 1]], nxt)
    t2_next = np.asarray(sp.sample(k_next, jnp.asarray(P2[t1])))
    t2 = np.where(n >= 2, inputs[np.arange(B), path[:, min(2, path.shape[1] - 1)]],
                  np.where(n == 1, nxt, t2_next))
    counts = np.bincount(t1 * V + t2, minlength=V * V)
    return counts, (P1[:, None] * P2).ravel()


TREES = {
    "chain": TreeTemplate.chain(3),
    "tree": TreeTemplate.kary((3, 2)),
}
SETTINGS = [sp.Sampling(1.0), sp.Sampling(0.7, top_k=3), sp.Sampling(1.2, top_p=0.8)]


@pytest.mark.parametrize("shape", list(TREES))
@pytest.mark.parametrize("mode", ["sampled", "deterministic"])
@pytest.mark.parametrize("s", SETTINGS, ids=["t1", "topk", "topp"])
def test_verification_is_lossless(shape, mode, s):
    counts, law = _run(TREES[shape], mode, s)
    _assert_matches(counts, law)


@pytest.mark.parametrize("mode", ["sampled", "deterministic"])
def test_broken_verifier_is_caught(mode, monkeypatch):
    """Without the residual distribution (resampling from p after a rejection) the law is wrong."""
    monkeypatch.setattr(verify_mod, "_residual", lambda p, q, token: p)
    counts, law = _run(TREES["tree"], mode, sp.Sampling(1.0))
    with pytest.raises(AssertionError, match="chi2"):
        _assert_matches(counts, law)


@pytest.mark.parametrize("drafter", ["chain", "tree_sampled", "tree_topk", "token_recycling", "pld", "lookahead",
                                     "sam", "sam_tr", "medusa", "medusa_vocab", "eagle", "eagle_vocab",
                                     "hydra_vocab", "eagle_structure", "tree_sampled_structure",
                                     "early_exit", "early_exit_svip", "specdecpp", "chain_vocab"])
def test_engine_sampling_matches_ar(drafter):
    """End to end: the first three tokens from speculative engines follow AR sampling's law."""
    from spec_jax.decoding import Engine
    from spec_jax.drafters import hydra
    from spec_jax.drafters.draft_model import DraftModel, DraftModelTree
    from spec_jax.drafters.dynamic_tree import DynamicTree
    from spec_jax.drafters.eagle import Eagle, init_eagle
    from spec_jax.drafters.early_exit import EarlyExit
    from spec_jax.drafters.lookahead import Lookahead
    from spec_jax.drafters.medusa import MEDUSA_TREES, Medusa, init_heads
    from spec_jax.drafters.prompt_lookup import PromptLookup
    from spec_jax.drafters.specdecpp import SpecDecPP, init_head
    from spec_jax.drafters.structure import Structure, init_structure, input_size
    from spec_jax.drafters.suffix_automaton import SAMTokenRecycling, SuffixAutomatonDrafter
    from spec_jax.drafters.token_recycling import TokenRecycling
    from spec_jax.drafters.vocab import reduced_vocab
    from spec_jax.models import Config, init_params, truncate
    from spec_jax.policies import make_policy

    cfg = Config(vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                 num_kv_heads=1, head_dim=16, eos_token_ids=())
    params = init_params(cfg, jax.random.key(3))
    params = jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, params)  # sharper distributions
    dparams, dcfg = truncate(params, cfg, 1)
    s = sp.Sampling(1.0)
    prompt = [[1, 2, 3, 1, 2, 3]] * 10_000

    def joint(engine, weights, carry, seed):
        padded, lens = engine.pad_prompts(prompt)
        size = engine.cache_size(6, 3)
        st = engine.prefill(params, weights, carry, padded, lens, 3, seed, size)
        st = engine.run(params, weights, st, 1 << 30)
        toks = np.asarray(st.tokens_BxS[:, 6:9])
        return np.bincount(toks[:, 0] * 64 + toks[:, 1] * 8 + toks[:, 2], minlength=512)

    ar = sum(joint(Engine(cfg, sampling=s), None, None, seed) for seed in range(2))
    spec_drafter = {
        "chain": DraftModel(draft_cfg=dcfg, policy=make_policy("fixed", 3)),
        "tree_sampled": DraftModelTree(draft_cfg=dcfg, tree=DynamicTree(depth=3, width=2, k=3, sampled=True)),
        "tree_topk": DraftModelTree(draft_cfg=dcfg, tree=DynamicTree(depth=3, width=2, k=3, budget=8)),
        "token_recycling": TokenRecycling(k=3, levels=(3, 4, 2)),
        "pld": PromptLookup(k=3, max_ngram=2),
        "lookahead": Lookahead(window=2, ngram=3, candidates=2),  # pool seeded with the prompt's n-grams
        "sam": SuffixAutomatonDrafter(k=3),
        "sam_tr": SAMTokenRecycling(k=3, levels=(3, 2), sam_k=3, min_match=2),
        "medusa": Medusa(num_heads=3, paths=MEDUSA_TREES["sim_8"]),
        "eagle": Eagle(tree=DynamicTree(depth=3, width=2, k=3, budget=8)),
        # A draft-structure predictor (AdaEAGLE) cuts each sequence's tree at its own depth.
        "eagle_structure": Eagle(tree=DynamicTree(depth=3, width=2, k=3, budget=8), structure=Structure(margin=0)),
        "tree_sampled_structure": DraftModelTree(draft_cfg=dcfg, tree=DynamicTree(depth=3, width=2, k=3, sampled=True),
                                                 structure=Structure(margin=0)),
        "hydra": hydra.Hydra(num_heads=3, prefix_layer=True, paths=MEDUSA_TREES["sim_8"]),
        "early_exit": EarlyExit(exit_layer=1, policy=make_policy("fixed", 3)),
        # An entropy stop: chains of 1 to 3 drafts, so fewer exit states than slots are kept some steps.
        "early_exit_svip": EarlyExit(exit_layer=1, policy=make_policy("svip", 3)),
        "specdecpp": SpecDecPP(draft_cfg=dcfg, policy=make_policy("fixed", 3), threshold=0.5, min_k=1),
    }[drafter.removesuffix("_vocab")]
    carry = None
    if drafter in ("token_recycling", "sam_tr"):  # a random warm matrix: the first step drafts real trees
        carry = np.random.default_rng(0).integers(0, 8, size=(8, 3)).astype(np.int32)
    weights = dparams if drafter.startswith(("chain", "tree")) else None
    if drafter.startswith("medusa"):  # random heads (zero ones draft the LM head's own top tokens)
        weights = init_heads(cfg, 3, jax.random.key(4), scale=0.5)
    if drafter.startswith("eagle"):
        weights = init_eagle(cfg, jax.random.key(4))
    if drafter.startswith("hydra"):  # (tests/test_hydra.py checks the full vocabulary against the exact law)
        weights = hydra.init_heads(cfg, 3, jax.random.key(4), prefix_layer=True, scale=0.5)
    if drafter.endswith("_structure"):  # a random predictor: depths 1 to 3 vary with the sampled context
        head = init_structure(input_size(32, 32), 16, jax.random.key(5))
        head["fc2"] = {"kernel": head["fc2"]["kernel"] * 3, "bias": jnp.full((1,), 1.5)}
        weights = {**weights, "structure": head}
    if drafter.startswith("early_exit"):  # the first layer drafts; verification runs the second from its exit states
        weights = {}
    if drafter == "specdecpp":  # a random acceptance head, centred: chains of 2 or 3 drafts by the sampled token
        head = init_head(32, 3, jax.random.key(6))
        head["out"]["bias"] = head["out"]["bias"] - jnp.array([1.1, 0.0])
        weights = {"draft": dparams, "head": head}
    if drafter.endswith("_vocab"):  # drafts from half the vocabulary, in a shuffled frequency order
        ranking = np.random.default_rng(1).permutation(cfg.vocab_size)
        weights = {**weights, "vocab": reduced_vocab(params, cfg, ranking, 4)}
    spec_engine = Engine(cfg, spec_drafter, s)
    spec = sum(joint(spec_engine, weights, carry, seed + 100) for seed in range(2))
    # Two-sample chi-square between the AR and speculative samples.
    keep = (ar + spec) >= 10
    a, b = ar[keep], spec[keep]
    chi2 = np.sum((a - b) ** 2 / (a + b))
    assert chi2 < _chi2_critical(int(keep.sum()) - 1), chi2
