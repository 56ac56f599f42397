"""The embedded SmolLM2-135M-Instruct: our GGUF loader against transformers' on the same file."""


import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spec_jax.decoding import Engine, generate  # noqa: E402
from spec_jax.models import forward, init_cache  # noqa: E402
from spec_jax.models.registry import load_model, load_tokenizer, resolve  # noqa: E402

pytestmark = pytest.mark.real_model
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def both():
    from transformers import AutoModelForCausalLM

    path = resolve("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    params, cfg = load_model("smollm2-135m")
    return hf, params, cfg, load_tokenizer("smollm2-135m")


def test_logits_and_greedy_match_transformers(both):
    hf, params, cfg, tok = both
    for text in PROMPTS:
        ids = tok(text).input_ids
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits.numpy()
            hf_gen = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        got = forward(params, cfg, np.asarray([ids]), np.arange(len(ids))[None], init_cache(cfg, 1, 64)).logits
        # Both dequantise the same Q4_1/Q8_0 bytes; differences are fp32 summation order only.
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-3)
        assert generate(Engine(cfg), params, [ids], 32).token_ids[0] == hf_gen


def test_tokenizer_without_torch_equals_transformers():
    """Our GGUF tokenizer path (the `gguf` reader, no PyTorch) builds transformers' own tokenizer."""
    from transformers import AutoTokenizer

    from spec_jax.models.registry import _tokenizer_from_gguf

    path = resolve("smollm2-135m")
    ours, theirs = _tokenizer_from_gguf(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours.get_vocab() == theirs.get_vocab() and ours.eos_token == theirs.eos_token
    for text in [*PROMPTS, "  tabs\tand ünïcode  "]:
        assert ours(text).input_ids == theirs(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == theirs.apply_chat_template(
        chat, add_generation_prompt=True)


def test_shipped_medusa_heads_draft_losslessly(both):
    """`--method medusa` on the embedded model uses the heads shipped in spec_jax/heads/ (trained by
    configs/medusa_smollm2.yaml): greedy-exact against AR at batch 2, and accepted more than untrained heads."""
    from spec_jax.drafters.medusa import Medusa, init_heads, load_heads, shipped_heads, tree_paths

    _, params, cfg, tok = both
    path = shipped_heads(cfg)
    assert path is not None and path.name == "medusa_smollm2"
    heads = load_heads(path, cfg)
    K = int(heads["kernel"].shape[0])
    from spec_jax.text import encode_messages

    prompts = [encode_messages(tok, [{"role": "user", "content": q}])
               for q in ("Name three rivers in Europe.", "How do I boil an egg?")]
    ar = generate(Engine(cfg), params, prompts, 48)
    drafter = Medusa(num_heads=K, paths=tree_paths("sim_8", K))
    trained = generate(Engine(cfg, drafter), params, prompts, 48, weights=heads)
    untrained = generate(Engine(cfg, drafter), params, prompts, 48, weights=init_heads(cfg, K))
    assert trained.token_ids == ar.token_ids == untrained.token_ids
    assert trained.stats()["tau"] > untrained.stats()["tau"]


@pytest.mark.parametrize("method", ["hydra", "eagle"])
def test_shipped_hydra_and_eagle_draft_losslessly(method, both):
    """`--method hydra|eagle` on the embedded model builds from the drafts shipped in spec_jax/heads/ (trained
    by scripts/train_heads_smollm2.sh): greedy-exact against AR at batch 2, with the full and a reduced draft
    vocabulary, and accepted well above chance (tau > 1.3 over 48 tokens)."""
    from spec_jax.drafters import head_checkpoints as hc
    from spec_jax.drafters.registry import Target, build, get
    from spec_jax.text import encode_messages

    _, params, cfg, tok = both
    assert hc.shipped_heads(cfg, method) is not None
    target = Target(params=params, cfg=cfg, tokenizer=tok)
    prompts = [encode_messages(tok, [{"role": "user", "content": q}])
               for q in ("Name three rivers in Europe.", "How do I boil an egg?")]
    ar = generate(Engine(cfg), params, prompts, 48)
    for vocab in (0, 4096):
        opts = {o.name: o.default for o in get(method).options} | {"draft_vocab": vocab}
        built = build(method, opts, target)
        g = generate(Engine(cfg, built.drafter), params, prompts, 48, weights=built.weights)
        assert g.token_ids == ar.token_ids, vocab
        assert g.stats()["tau"] > 1.3, (vocab, g.stats())


def test_shipped_structure_predictor_drafts_losslessly(both):
    """`--method eagle` with the draft-structure predictor shipped for its draft (spec_jax/heads/
    structure_eagle_smollm2, AdaEAGLE's length predictor): greedy-exact against AR at batch 2 and batch 1."""
    from spec_jax.drafters import head_checkpoints as hc
    from spec_jax.drafters.registry import Target, build, get
    from spec_jax.text import encode_messages

    _, params, cfg, tok = both
    target = Target(params=params, cfg=cfg, tokenizer=tok)
    prompts = [encode_messages(tok, [{"role": "user", "content": q}])
               for q in ("Name three rivers in Europe.", "How do I boil an egg?")]
    ar = generate(Engine(cfg), params, prompts, 48)
    opts = {o.name: o.default for o in get("eagle").options}
    built = build("eagle", opts | {"structure_head": str(hc.SHIPPED / "structure_eagle_smollm2")}, target)
    assert built.drafter.structure is not None
    engine = Engine(cfg, built.drafter)
    g = generate(engine, params, prompts, 48, weights=built.weights)
    assert g.token_ids == ar.token_ids
    assert generate(engine, params, prompts[1:], 48, weights=built.weights).token_ids[0] == ar.token_ids[1]
    assert g.stats()["tau"] > 1.1, g.stats()


def test_shipped_early_exit_adapter_drafts_losslessly(both):
    """`--method early_exit` on the embedded model builds from the adapters shipped in spec_jax/heads/
    early_exit_smollm2 (configs/early_exit_smollm2.yaml): greedy-exact against AR at batch 2 and batch 1, with
    the full and a reduced exit-head vocabulary, and accepted more than the plain exit at the same layer."""
    from spec_jax.drafters import head_checkpoints as hc
    from spec_jax.drafters.registry import Target, build, get
    from spec_jax.text import encode_messages

    _, params, cfg, tok = both
    assert hc.shipped_heads(cfg, "early_exit") is not None
    target = Target(params=params, cfg=cfg, tokenizer=tok)
    prompts = [encode_messages(tok, [{"role": "user", "content": q}])
               for q in ("Name three rivers in Europe.", "How do I boil an egg?")]
    ar = generate(Engine(cfg), params, prompts, 48)
    defaults = {o.name: o.default for o in get("early_exit").options}
    trained = build("early_exit", defaults, target)
    assert "adapter" in trained.weights
    same_exit = {"exit_layer": trained.drafter.exit_layer, "draft_k": trained.drafter.policy.k}
    taus = {}
    for name, opts in (("trained", {}), ("vocab", {"draft_vocab": 4096}), ("plain", {"exit_head": "none"})):
        built = build("early_exit", defaults | same_exit | opts, target)
        g = generate(Engine(cfg, built.drafter), params, prompts, 48, weights=built.weights)
        assert g.token_ids == ar.token_ids, name
        taus[name] = g.stats()["tau"]
    single = generate(Engine(cfg, trained.drafter), params, prompts[1:], 48, weights=trained.weights)
    assert single.token_ids[0] == ar.token_ids[1]
    assert taus["trained"] > taus["plain"], taus


@pytest.mark.parametrize("method,extra", [("draft", {"draft_k": 3}), ("draft", {"draft_vocab": 8192}),
                                          ("draft_tree", {})], ids=["chain", "chain-vocab", "tree"])
def test_shipped_distilled_draft_is_greedy_exact(both, method, extra):
    """The distilled draft shipped for the embedded model (spec_jax/heads/draft_smollm2, the default of `draft` and
    `draft_tree`) drafts tokens the target accepts, and the output is AR's at batch 2."""
    from spec_jax.drafters.registry import Target, build, get
    from spec_jax.text import encode_messages

    _, params, cfg, tok = both
    target = Target(params=params, cfg=cfg, tokenizer=tok)
    prompts = [encode_messages(tok, [{"role": "user", "content": q}])
               for q in ("Name three rivers in Europe.", "How do I boil an egg?")]
    built = build(method, {o.name: o.default for o in get(method).options} | extra, target)
    g = generate(Engine(cfg, built.drafter), params, prompts, 48, weights=built.weights)
    assert g.token_ids == generate(Engine(cfg), params, prompts, 48).token_ids
    assert g.stats()["tau"] > 1.1, g.stats()  # the 8-layer stand-in it replaced reached 1.04


def test_shipped_specdecpp_head_drafts_losslessly(both):
    """`--method specdecpp` on the embedded model with the distilled draft and the acceptance head shipped for it
    (spec_jax/heads/specdecpp_smollm2): greedy-exact against AR at batch 2 and batch 1."""
    from spec_jax.drafters.registry import Target, build, get
    from spec_jax.text import encode_messages

    _, params, cfg, tok = both
    target = Target(params=params, cfg=cfg, tokenizer=tok)
    prompts = [encode_messages(tok, [{"role": "user", "content": q}])
               for q in ("Name three rivers in Europe.", "How do I boil an egg?")]
    ar = generate(Engine(cfg), params, prompts, 48)
    built = build("specdecpp", {o.name: o.default for o in get("specdecpp").options} | {"max_k": 8}, target)
    engine = Engine(cfg, built.drafter)
    g = generate(engine, params, prompts, 48, weights=built.weights)
    assert g.token_ids == ar.token_ids
    assert generate(engine, params, prompts[1:], 48, weights=built.weights).token_ids[0] == ar.token_ids[1]
    assert g.stats()["tau"] > 1.1, g.stats()
