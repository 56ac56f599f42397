import jax
import numpy as np
import pytest

from spec_jax.models import Config, init_params

TINY = Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, eos_token_ids=(), max_position_embeddings=1024)


@pytest.fixture(scope="session")
def tiny():
    """A tiny random fp32 Llama (4 layers so layer skipping has something to skip)."""
    cfg = TINY.replace(num_layers=4)
    return init_params(cfg, jax.random.key(0)), cfg


@pytest.fixture(scope="session")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 256, size=n).tolist() for n in (3, 7, 12)]


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, exported as an HF directory."""
    from spec_jax.models.loading import export_hf
    from spec_jax.models.registry import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    cfg = TINY.replace(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, eos_token_ids=(), max_position_embeddings=2048)
    params = init_params(cfg, jax.random.key(0))
    return export_hf(params, cfg, tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer=tok)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs and traced constants after each test module: the suite compiles hundreds
    of engines (several with 10,000-sequence batches), and keeping them all grew one process past 24 GB."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
