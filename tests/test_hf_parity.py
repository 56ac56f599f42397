"""Parity with Hugging Face transformers on tiny random Llama and Qwen2 models (levanter-style)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from spec_jax.decoding import Engine, generate  # noqa: E402
from spec_jax.models import forward, init_cache  # noqa: E402
from spec_jax.models.loading import export_hf, load_hf  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


def _hf_model(kind, tmp_path):
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if kind == "llama":
        cfg = transformers.LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64},
                                       tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # non-zero biases so they are really tested
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.eval()
    path = tmp_path / kind
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_parity_forward_cached_generate_export(kind, tmp_path):
    hf, path = _hf_model(kind, tmp_path)
    params, cfg = load_hf(path)
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 11))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()

    full = forward(params, cfg, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(11), (2, 11)), init_cache(cfg, 2, 32))
    np.testing.assert_allclose(np.asarray(full.logits), want, **TOL)

    # Prefill 5 tokens, then decode one token at a time from the cache.
    cache = init_cache(cfg, 2, 32)
    out = forward(params, cfg, jnp.asarray(ids[:, :5]), jnp.broadcast_to(jnp.arange(5), (2, 5)), cache)
    cache = out.cache.replace(lengths=cache.lengths + 5)
    steps = [out.logits]
    for t in range(5, 11):
        out = forward(params, cfg, jnp.asarray(ids[:, t:t + 1]), jnp.full((2, 1), t), cache)
        cache = out.cache.replace(lengths=cache.lengths + 1)
        steps.append(out.logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1), want, **TOL)

    # Greedy generation: 32 tokens identical to HF generate.
    prompt = ids[0, :6].tolist()
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                             min_new_tokens=32)[0, 6:].tolist()
    ours = generate(Engine(cfg), params, [prompt], 32).token_ids[0]
    assert ours == hf_out

    # Export back to HF and compare again in transformers.
    out_dir = export_hf(params, cfg, tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.tensor(ids)).logits.numpy(), want, **TOL)
