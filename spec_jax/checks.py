"""Checks at the boundary, run before any model is loaded: number ranges, input files, output paths, text.

Each check names what the user wrote (the flag or config key, the file) and says how to fix it.
`Range` doubles as an argparse `type`, so a flag's range is declared once, next to the flag, and the
same check reads the values of a YAML config (`cli.load_config`) and of a bench entry's
`name/option=value` settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
from pathlib import Path

from spec_jax.errors import DataFormatError, InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class Range:
    """A number type with bounds, e.g. `Range(int, 1)`: an integer >= 1; `Range(float, 0, 1, min_open=True)`:
    a number in (0, 1]. Calling it converts a flag's text (or a config's value) or raises
    `argparse.ArgumentTypeError` with the reason."""

    kind: type = int
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # the minimum itself is excluded

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        if self.min is not None and self.max is not None:
            return f"{noun} in {'(' if self.min_open else '['}{self.min}, {self.max}]"
        if self.min is not None:
            return f"{noun} {'>' if self.min_open else '>='} {self.min}"
        if self.max is not None:
            return f"{noun} <= {self.max}"
        return noun

    def __call__(self, value):
        if isinstance(value, bool) or (self.kind is int and isinstance(value, float) and not value.is_integer()):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {value!r}")
        try:
            out = self.kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {value!r}") from None
        below = self.min is not None and (out < self.min or (self.min_open and out == self.min))
        if not math.isfinite(out) or below or (self.max is not None and out > self.max):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {out}")
        return out


def input_file(path: str | os.PathLike, flag: str, hint: str = "") -> Path:
    """An existing, readable file."""
    p = Path(path)
    if not p.exists():
        raise InvalidArgumentError(f"{flag} {path}: no such file{hint}")
    if p.is_dir():
        raise InvalidArgumentError(f"{flag} {path}: is a directory; give a file name")
    if not p.is_file():
        raise InvalidArgumentError(f"{flag} {path}: not a regular file")
    if not os.access(p, os.R_OK):
        raise InvalidArgumentError(f"{flag} {path}: not readable (permission denied)")
    return p


def output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file path that can be written (atomically: its directory must take a new file)."""
    p = Path(path)
    if p.is_dir():
        raise InvalidArgumentError(f"{flag} {path}: is a directory; give a file name")
    _check_writable_dir(p.parent, flag, path)
    return p


def output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A directory that exists and can be written, or can be created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InvalidArgumentError(f"{flag} {path}: exists and is not a directory; give a folder name")
    _check_writable_dir(p, flag, path)
    return p


def _check_writable_dir(d: Path, flag: str, shown) -> None:
    """`d`, or the nearest ancestor that exists, takes a new file (probed: permission bits say nothing to root,
    nor about read-only file systems)."""
    while not d.exists():
        if d.is_symlink() or d.parent == d:
            raise InvalidArgumentError(f"{flag} {shown}: cannot create the folder {d}")
        d = d.parent
    if not d.is_dir():
        raise InvalidArgumentError(f"{flag} {shown}: {d} is not a directory")
    try:
        tempfile.TemporaryFile(dir=d).close()  # unnamed where the OS allows: nothing to leave behind
    except OSError as e:
        raise InvalidArgumentError(f"{flag} {shown}: cannot write in {d} ({e.strerror}); choose a writable "
                                   "location") from None


def utf8_arg(text: str, flag: str) -> str:
    """Command-line text that is valid UTF-8 (Python keeps undecodable argv bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise InvalidArgumentError(f"{flag}: not valid UTF-8 text (byte 0x{bad.hex()} at character {e.start}); "
                                   "pass UTF-8 text") from None
    return text


def read_yaml(path: str | os.PathLike, flag: str = "--config"):
    """A YAML file's contents (an empty file is {}), refused in one line when it is missing or not YAML."""
    import yaml

    input_file(path, flag)
    try:
        return yaml.safe_load(Path(path).read_bytes()) or {}
    except yaml.YAMLError as e:
        raise InvalidArgumentError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None


def read_utf8(path: str | os.PathLike, what: str) -> str:
    """A text file's contents, refused with its line number when it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x}); "
                              "convert it to UTF-8 (e.g. iconv -t utf-8)") from None


def token_ids_in_range(ids, vocab_size: int, source: str, hint: str = "") -> None:
    """Refuse token ids outside [0, vocab_size): a drafter fed them would draft garbage, and a matrix row
    indexed by them would be dropped or clamped, so a lossless method would silently lose its guarantee."""
    import numpy as np

    a = np.asarray(ids)
    if a.size == 0:
        return
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = np.argwhere(a == bad)[0]
        at = f" at index {tuple(int(i) for i in where)}" if a.ndim > 1 else f" at position {int(where[0])}"
        raise DataFormatError(f"{source}: token id {bad}{at} is outside this model's vocabulary [0, {vocab_size})"
                              f"{hint}")
