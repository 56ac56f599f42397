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

params, cfg = load_model("smollm2-135m")
tok = load_tokenizer("smollm2-135m")
engine = Engine(cfg)
prompt = P.prompt_tokens(tok, 256)
size = engine.cache_size(256, 64)
cache = P.filled_cache(engine, params, prompt, size)
L = cfg.num_layers
L0 = int(cache.lengths[0])
layers = [params[f"layers_{i}"] for i in range(L)]

gemvs = jax.jit(P.weight_matmuls)

fwd = jax.jit(lambda p, c, t, q, logits: llama.forward(p, cfg, t, q, c, compute_logits=logits),
              static_argnums=(4,), donate_argnums=(1,))
state = {"c": cache}
def run_fwd(t, q, logits):
    out = fwd(params, state["c"], t, q, logits)  # the cache is donated: keep the returned one
    state["c"] = out.cache
    return out.logits if logits else out.hidden
for T in (1, 2, 4, 8, 16):
    x = jnp.ones((1, T, cfg.hidden_size), jnp.float32) * 0.01
    g = P.best_seconds(gemvs, layers, x, number=3) * 1e3
    t = jnp.zeros((1, T), jnp.int32)
    q = L0 + jnp.arange(T)[None]
    f = P.best_seconds(lambda t, q: run_fwd(t, q, True), t, q, number=3) * 1e3
    print(f"T={T:2d}: weight GEMVs {g:6.2f} ms   forward+logits {f:6.2f} ms", flush=True)
