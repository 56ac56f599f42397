"""Project exceptions: each says what is wrong and how to fix it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run long), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class SpecJaxError(Exception):
    """Base class for every error spec-jax raises on purpose."""


class CheckpointError(SpecJaxError):
    """A checkpoint or model file is missing, truncated or corrupt."""


class ModelNotFoundError(CheckpointError):
    """A named model or a model path could not be found."""


class UnsupportedArchitectureError(SpecJaxError):
    """The checkpoint describes an architecture spec-jax does not implement."""


class InvalidArgumentError(SpecJaxError, ValueError):
    """A user-supplied argument (sampling parameter, prompt, length) is invalid."""


class CacheOverflowError(InvalidArgumentError):
    """The prompt plus the requested generation (or draft tree) does not fit the KV cache."""


class TokenizerMismatchError(SpecJaxError):
    """Draft and target models do not share a vocabulary or tokenizer."""


class DataFormatError(SpecJaxError):
    """A data file (prompt set, calibration file, drafter state) is malformed."""


class DrafterContractError(SpecJaxError):
    """A drafter does not keep to what its `DraftShape` declares (nodes, depth, target scratch slots)."""


class OutputError(SpecJaxError):
    """A result or side file could not be written (the message names the user's path, not a temporary file)."""
