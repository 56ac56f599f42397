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


RECIPE_PROMPTS = ["Name three colours.", "What is two plus two?", "Write a haiku about rain.", "Say hello in French.",
                  "List the days of the week.", "Why is the sky blue?", "Count to five.", "What is a noun?"]


def make_recipe_data(out_dir, model_dir, target, hidden_layers):
    """A tiny self-distillation store (what the training recipes read): RECIPE_PROMPTS answered by `target`, 16 new
    tokens each, with the hidden states of `hidden_layers`; returns its directory."""
    import json

    from spec_jax.training import data as D

    prompts = out_dir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in RECIPE_PROMPTS), encoding="utf-8")
    job = D.DataJob(out=str(out_dir / "data"), model=str(model_dir), prompts=str(prompts), num_prompts=8,
                    max_prompt_tokens=48, max_new_tokens=16, batch_size=4, shard_size=4,
                    hidden_layers=tuple(hidden_layers), seed=0)
    D.make_data(job, target=target, progress=False)
    return out_dir / "data"


@pytest.fixture(scope="session")
def tiny_target(tiny_hf_dir):
    """The tiny HF model loaded as a decoding target (tokenizer, params, config)."""
    from spec_jax.decoding.setup import load_target

    return load_target(tiny_hf_dir, "float32")


@pytest.fixture(scope="session")
def tiny_recipe_data(tmp_path_factory, tiny_hf_dir, tiny_target):
    """The tiny model's self-distillation store, with the hidden states of layers 1 and 2 (its last)."""
    return make_recipe_data(tmp_path_factory.mktemp("recipe"), tiny_hf_dir, tiny_target,
                            (1, tiny_target.cfg.num_layers))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs and traced constants after each test module: the suite compiles hundreds
    of engines (several with 10,000-sequence batches), and keeping them all grew one process past 24 GB."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def target(tiny_target):
    """The recipe tests' target: the tiny HF model (a module defining its own `target` overrides this)."""
    return tiny_target


@pytest.fixture(scope="session")
def data_dir(tiny_recipe_data):
    """The recipe tests' self-distillation store (a module defining its own `data_dir` overrides this)."""
    return tiny_recipe_data


class _Stop(Exception):
    pass


def assert_resume_exact(parts_for, run_dir, stop_at, resumed_from, after_cut=lambda: None):
    """A training run interrupted at step `stop_at` and started again (parts built anew, as a restarted process
    would) resumes from its checkpoint at `resumed_from` and ends with the parameters and losses of a run never
    stopped. `parts_for(name)` gives (recipe, parts) for a run whose files lie in `run_dir(name)`; `after_cut`
    checks what the interrupted run left."""
    from spec_jax.training import read_records
    from spec_jax.training.loop import train

    results = {}
    for name in ("whole", "cut"):
        recipe, parts = parts_for(name)
        if name == "cut":
            def stopping(step, batches=parts.batches, **kw):
                if step == stop_at:
                    raise _Stop
                return batches(step, **kw)
            with pytest.raises(_Stop):
                train(recipe.train, parts.loss_fn, parts.params, parts.frozen, stopping, progress=False)
            after_cut()
            recipe, parts = parts_for(name)
        results[name] = train(recipe.train, parts.loss_fn, parts.params, parts.frozen, parts.batches, progress=False)
    assert results["cut"].resumed_from == resumed_from
    for a, b in zip(jax.tree.leaves(results["cut"].params), jax.tree.leaves(results["whole"].params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses = {n: {r["step"]: r["loss"] for r in read_records(run_dir(n) / "metrics.jsonl") if "loss" in r}
              for n in results}
    assert losses["cut"] == losses["whole"]
