"""Mesh construction and the one table that maps logical axes to physical mesh axes.

Every parameter, activation and cache array is described by logical axis names (`vocab`, `embed`,
`heads`, `kv_heads`, `mlp`, `batch`, ...); `RULES` maps them onto the mesh axes `("data", "model")`.
A dimension that the mesh axis does not divide (SmolLM2 has 3 KV heads) stays replicated, so the
same code runs on 1 CPU, 8 simulated CPU devices, a GPU or a TPU pod slice.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

RULES: dict[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "embed": None,  # set to DATA for FSDP-style training
    "norm": None,
    "seq": None,
    "head_dim": None,
}


def make_mesh(data: int = 1, model: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "model") mesh over the first data*model devices, with automatic sharding propagation."""
    devices = list(devices if devices is not None else jax.devices())
    if data * model > len(devices):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, found {len(devices)}")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * model])


def spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh, rules=None) -> PartitionSpec:
    """PartitionSpec for logical `axes`, leaving replicated any dim the mesh axis does not divide."""
    rules = RULES if rules is None else rules
    out = []
    for name, dim in zip(axes, shape, strict=True):
        phys = rules.get(name) if name is not None else None
        if phys is not None and (dim % mesh.shape[phys] != 0 or phys in out):
            phys = None
        out.append(phys)
    return PartitionSpec(*out)


def logical_sharding(axes, shape, mesh, rules=None) -> NamedSharding:
    return NamedSharding(mesh, spec(tuple(axes), tuple(shape), mesh, rules))


def tree_shardings(axes_tree, value_tree, mesh, rules=None):
    """NamedShardings for a pytree given a matching pytree of logical-axis tuples."""
    return jax.tree.map(lambda ax, v: logical_sharding(ax, np.shape(v), mesh, rules), axes_tree,
                        value_tree, is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(x, mesh) -> NamedSharding:
    """Shard the leading (batch) dimension over `data`, replicate the rest."""
    shape = np.shape(x)
    if not shape:
        return replicated(mesh)
    return logical_sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh)


FSDP_MIN_SIZE = 2**14  # smaller arrays stay replicated under FSDP: splitting them would save little memory


def fsdp_sharding(x, mesh, axis: str = DATA, min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
    """`x`'s sharding for FSDP-style training: split over mesh `axis` along its largest dimension that `axis`'s
    size divides (the last of equal ones), replicated when it has no such dimension or fewer than `min_size`
    elements.

    Trainable pytrees (draft heads, say `kernel [K, E, E]`) carry no logical axis names, so the dimension is
    chosen by shape: the largest is the hidden size (or the vocabulary) in every head family here. Any choice
    computes the same thing, since XLA gathers the array where a step uses it whole; the largest gives the
    smallest shards."""
    shape, n = np.shape(x), mesh.shape[axis]
    fits = [i for i, dim in enumerate(shape) if dim % n == 0]
    if n == 1 or not fits or np.prod(shape, dtype=np.int64) < min_size:
        return replicated(mesh)
    dim = max(fits, key=lambda i: (shape[i], i))
    return NamedSharding(mesh, PartitionSpec(*(axis if i == dim else None for i in range(len(shape)))))


def parse_mesh(text: str | None, devices=None):
    """`--mesh`: None or '' (no mesh), 'auto' (every device on `model`), or 'data=2,model=4'."""
    from spec_jax.errors import InvalidArgumentError

    if not text:
        return None
    n = len(devices if devices is not None else jax.devices())
    if text == "auto":
        return make_mesh(1, n, devices)
    sizes = {DATA: 1, MODEL: 1}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise InvalidArgumentError(f"--mesh takes 'auto' or 'data=D,model=M' with positive sizes, got {text!r}")
        sizes[name.strip()] = int(value)
    if sizes[DATA] * sizes[MODEL] > n:
        raise InvalidArgumentError(f"--mesh {text} needs {sizes[DATA] * sizes[MODEL]} devices but {n} are visible "
                                   f"({jax.devices()[0].platform}); lower the sizes or use --mesh auto")
    if jax.process_count() > 1 and sizes[DATA] * sizes[MODEL] != n:
        raise InvalidArgumentError(f"--mesh {text} covers {sizes[DATA] * sizes[MODEL]} of the {n} devices of this "
                                   f"{jax.process_count()}-process job; a multi-host mesh must use every device "
                                   "(e.g. --mesh auto)")
    return make_mesh(sizes[DATA], sizes[MODEL], devices)


def to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global array: each process puts only its own shards."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def fetch(tree, mesh=None):
    """Host (numpy) copies of a pytree of arrays, also on a multi-host mesh where no process holds every
    shard: the arrays are first all-gathered to a replicated sharding, then each process reads its copy."""
    if mesh is None:
        return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), _gather(mesh)(tree))


@functools.lru_cache(maxsize=8)
def _gather(mesh):
    """One jitted all-gather to a replicated sharding per mesh (jit caches it per input shapes)."""
    return jax.jit(lambda t: t, out_shardings=replicated(mesh))
