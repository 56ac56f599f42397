"""Peak resident memory and seconds of loading a model: on one device, or with `--devices N` straight into the
shards of a (1, N) mesh of N simulated CPU devices. Prints one JSON line.

Run: python scripts/load_memory.py [--devices 8] [--model smollm2-135m] [--dtype float32]
"""

import argparse
import json
import os
import resource
import time


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=None, help="simulated CPU devices of a (1, N) mesh")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    if args.devices:  # must be set before jax is imported
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"

    import jax

    from spec_jax.models import param_bytes
    from spec_jax.models.registry import load_model
    from spec_jax.sharding import make_mesh

    mesh = make_mesh(1, args.devices) if args.devices else None
    before_mb = peak_rss_mb()
    start = time.perf_counter()
    params, _ = load_model(args.model, args.dtype, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    print(json.dumps({"model": args.model, "dtype": args.dtype, "devices": jax.device_count(),
                      "mesh": None if mesh is None else dict(mesh.shape),
                      "params_mb": round(param_bytes(params) / 2**20, 1),
                      "peak_rss_before_load_mb": round(before_mb, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                      "load_seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
