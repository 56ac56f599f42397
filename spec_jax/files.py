"""Where spec-jax keeps its caches, and the one way it writes a file: atomically.

A file is written to a temporary sibling and renamed over the target, so a crash or Ctrl-C leaves
either the old file or the new one, never half of one, and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from spec_jax.errors import OutputError


def cache_root() -> Path:
    """The cache directory: compiled programs, converted tokenizers, measured costs (`$SPEC_JAX_CACHE`)."""
    return Path(os.environ.get("SPEC_JAX_CACHE", Path.home() / ".cache" / "spec_jax"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed over `path` when the block succeeds, removed otherwise.

    The temporary name keeps the target's suffix. A directory target replaces any existing directory
    of that name. An `OSError` on the way (no space, no permission) becomes an `OutputError` that names
    `path`, the file the user asked for.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        _as_if_created(tmp, directory)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        yield tmp
        if directory and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:  # named by the user's path, not the temporary one
        raise OutputError(f"cannot write {path}: {e.strerror or e}; check the free space, quotas and "
                          "permissions there") from e
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _as_if_created(tmp: Path, directory: bool) -> None:
    """Give a temporary file or folder the permissions a plain `open`/`mkdir` would (mkstemp and mkdtemp make
    them private to the owner, which would stick to the renamed result)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary file, which then replaces `path`; returns `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
