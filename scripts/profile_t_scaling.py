"""What verifying T tokens costs against one: the target forward (with logits at every position) over T new tokens
after a 256-token prompt, and the layers' weight matmuls alone at M = T rows, on the real model (ms, median).

On XLA:CPU the step from T = 1 to T = 2 is where speculative methods lose: the weight bytes read are the same,
but the matmul kernel is not.

    python scripts/profile_t_scaling.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import profile_ar as P  # noqa: E402

from spec_jax.decoding.engine import Engine  # noqa: E402
from spec_jax.models import llama  # noqa: E402
from spec_jax.models.registry import load_model, load_tokenizer  # noqa: E402


def main() -> None:
    params, cfg = load_model("smollm2-135m")
    engine = Engine(cfg)
    prompt = P.prompt_tokens(load_tokenizer("smollm2-135m"), 256)
    cache = P.filled_cache(engine, params, prompt, engine.cache_size(len(prompt), 64))
    start = int(cache.lengths[0])
    layers = [params[f"layers_{i}"] for i in range(cfg.num_layers)]
    gemvs = jax.jit(P.weight_matmuls)
    fwd = jax.jit(lambda p, c, t, q: llama.forward(p, cfg, t, q, c), donate_argnums=(1,))

    def forward(t, q):  # the cache is donated: keep the returned one for the next call
        nonlocal cache
        out = fwd(params, cache, t, q)
        cache = out.cache
        return out.logits

    for T in (1, 2, 4, 8, 16):
        g = P.best_seconds(gemvs, layers, jnp.full((1, T, cfg.hidden_size), 0.01, jnp.float32), number=3)
        f = P.best_seconds(forward, jnp.zeros((1, T), jnp.int32), start + jnp.arange(T)[None], number=3)
        print(f"T={T:2d}: weight GEMVs {1e3 * g:6.2f} ms   forward+logits {1e3 * f:6.2f} ms", flush=True)


if __name__ == "__main__":
    main()
