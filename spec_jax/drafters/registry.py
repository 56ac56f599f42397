"""The method registry: every decoding method declares itself here, and everything above finds it here.

A method is one file under `spec_jax/drafters/` that calls `register` with its name, a one-line
description, its options (`Option`: name, type, default, help) and a builder. `spec-jax generate`,
`spec-jax bench`, YAML configs and `spec-jax methods` all read this table; adding a method touches
nothing else. Methods outside the package plug in the same way: a module that calls `register` and is
imported before the lookup (a test file, or a module named in `$SPEC_JAX_METHODS`, or an installed
package's `spec_jax.methods` entry point).

    @register("pld", "prompt lookup: copy what followed the last n-gram's earlier occurrence",
              options=(Option("draft_k", int, 5, "tokens drafted per step"),))
    def build(opts, target):  # opts: the method's option values; target: model, config, tokenizer
        return Built(PromptLookup(k=opts.draft_k))

Several methods may declare the same option (`draft_k`) with their own defaults; the command line has
one flag for it whose default is "the method's own".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable
from importlib import metadata
from types import SimpleNamespace
from typing import Any, NamedTuple

from spec_jax.checks import Range, input_file, output_file
from spec_jax.errors import InvalidArgumentError

PATH_KINDS = ("read", "write", "read_write")


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting of a method: `--name-with-dashes` on the command line, `name` in configs and code.

    `min`/`max` bound a number (checked before anything loads, the message naming the flag). `path`
    marks a file option: "read" (must exist), "write" (written after the run: its folder must be
    writable) or "read_write" (read if it exists, written after the run).
    """

    name: str
    type: type = int
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    path: str | None = None

    def __post_init__(self):
        if self.path not in (None, *PATH_KINDS):
            raise ValueError(f"option {self.name!r}: path must be one of {PATH_KINDS}, got {self.path!r}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value):
        """`value` (a flag's text, a config's value) as this option's type, within its range and choices;
        `argparse.ArgumentTypeError` otherwise (the `type` of this option's flag)."""
        if self.type is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
        if self.type in (int, float):
            out = Range(self.type, self.min, self.max)(value)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            out = self.type(value)
        else:
            raise argparse.ArgumentTypeError(f"expected a {self.type.__name__}, got {value!r}")
        if self.choices is not None and out not in self.choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, self.choices))}, got {out!r}")
        return out

    def parse(self, value, method: str):
        """`convert`, with a clear error naming the flag and the method (None stays None)."""
        if value is None:
            return None
        try:
            return self.convert(value)
        except argparse.ArgumentTypeError as e:
            raise InvalidArgumentError(f"{self.flag} (method {method}): {e}") from None


class Target(NamedTuple):
    """What a method's builder may use: the loaded target model, its tokenizer, and where it lives."""

    params: Any
    cfg: Any  # models.Config
    tokenizer: Any = None
    dtype: str = "float32"
    mesh: Any = None  # jax.sharding.Mesh, or None for one device


@dataclasses.dataclass
class Built:
    """A built method: the drafter, its trained weights, the state it carries across requests, and how
    to save that state after a run (e.g. Token Recycling's matrix to `--tr-matrix`)."""

    drafter: Any
    weights: Any = None
    carry: Any = None
    save: Callable[[Any], object] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    options: tuple[Option, ...]
    build: Callable[[SimpleNamespace, Target], Built]
    check: Callable[[SimpleNamespace, Any], None] | None  # (opts, model Config): refuse bad values before loading
    prunable: bool  # its drafter's static tree can be sized by `--budget N|auto` (TemplateDrafter.prunable)
    module: str  # imported by benchmark workers before the lookup (methods defined outside the package)
    source: str | None = None  # the module's file, for workers where `module` is not importable by name


_METHODS: dict[str, Method] = {}
_discovered = False


def register(name: str, description: str, options: tuple[Option, ...] = (),
             check: Callable[[SimpleNamespace, Any], None] | None = None, prunable: bool = False):
    """Decorator: register `build(opts, target) -> Built` as method `name`.

    `check(opts, cfg)`, if given, refuses what the options' own ranges cannot see (one option against
    another, an input file's contents against the model's `Config`) before any weights are loaded;
    its errors name the flags. The builder may assume it passed. `prunable` says, before anything is
    built, that the drafter's tree takes `--budget` (it must agree with the drafter's own `prunable`).
    """
    def deco(build):
        source = getattr(sys.modules.get(build.__module__), "__file__", None)
        old = _METHODS.get(name)
        if old is not None and old.module != build.__module__:
            raise ValueError(f"method {name!r} is registered twice: by {old.module} and by {build.__module__}")
        _METHODS[name] = Method(name=name, description=description, options=tuple(options), build=build,
                                check=check, prunable=prunable, module=build.__module__, source=source)
        return build
    return deco


def load_module(module: str, source: str | None = None) -> None:
    """Import the module that registered a method (by name, else from its file), e.g. in a worker process."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        if source is None:
            raise
        spec = importlib.util.spec_from_file_location(module, source)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        spec.loader.exec_module(mod)


def discover() -> None:
    """Import every drafter module of the package, `$SPEC_JAX_METHODS` modules and entry points (once)."""
    global _discovered
    if _discovered:
        return
    import spec_jax.drafters as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    for name in filter(None, os.environ.get("SPEC_JAX_METHODS", "").split(",")):
        importlib.import_module(name.strip())
    for ep in metadata.entry_points(group="spec_jax.methods"):
        ep.load()
    _discovered = True  # only once everything imported: a failed import is retried, not half-remembered


def methods() -> dict[str, Method]:
    """Every registered method by name: `ar` (the baseline) first, then alphabetical."""
    discover()
    return {name: _METHODS[name] for name in sorted(_METHODS, key=lambda n: (n != "ar", n))}


def get(name: str) -> Method:
    table = methods()
    if name not in table:
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(table)} "
                                   "(`spec-jax methods` lists them)")
    return table[name]


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Each option name once, with the first declaration and the methods that use it."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for m in methods().values():
        for opt in m.options:
            if opt.name in out:
                first, users = out[opt.name]
                if first.type is not opt.type:
                    raise TypeError(f"option {opt.name!r} is a {first.type.__name__} for {users[0]} but a "
                                    f"{opt.type.__name__} for {m.name}")
                users.append(m.name)
            else:
                out[opt.name] = (opt, [m.name])
    return out


def options_for(name: str, values: dict) -> SimpleNamespace:
    """The method's options from `values` (flag values by option name; None = the method's default)."""
    m = get(name)
    return SimpleNamespace(**{o.name: (o.default if values.get(o.name) is None else o.parse(values[o.name], name))
                              for o in m.options})


def validate(name: str, values: dict, cfg=None) -> SimpleNamespace:
    """Every check of method `name` that needs no weights: the options' types and ranges, their files
    (existing, or in a writable folder), then the method's own `check` against the model's config (when
    `cfg` is given). Returns the options."""
    m = get(name)
    opts = options_for(name, values)
    for o in m.options:
        value = getattr(opts, o.name)
        if o.path is None or value is None:
            continue
        if o.path == "read" or (o.path == "read_write" and os.path.exists(value)):
            input_file(value, o.flag)
        if o.path in ("write", "read_write"):
            output_file(value, o.flag)
    if cfg is not None and m.check is not None:
        m.check(opts, cfg)
    return opts


def build(name: str, values: dict, target: Target) -> Built:
    """Build method `name` from option values for the target model."""
    m = get(name)
    built = m.build(validate(name, values, target.cfg), target)
    if not isinstance(built, Built):
        raise TypeError(f"the builder of method {name!r} returned {type(built).__name__}, expected Built")
    if getattr(built.drafter, "prunable", False) != m.prunable:
        raise TypeError(f"method {name!r} is registered with prunable={m.prunable} but its drafter says otherwise")
    return built
