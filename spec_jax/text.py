"""Prompts as token ids: the chat template, and the calibration prompts that tools share.

Used by the command line, the benchmarks and calibration (`--budget auto`, `search-skip`), so it sits
below all of them.
"""

from __future__ import annotations

from spec_jax.errors import InvalidArgumentError

# Varied, short instructions for calibration runs (skip-set search, --budget auto).
CALIBRATION_PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a Python function that checks whether a number is prime.",
    "Give three tips for staying focused while studying.",
    "Summarise the causes of the French Revolution in a paragraph.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short poem about the sea.",
]


def encode_messages(tok, messages: list[dict]) -> list[int]:
    """A conversation through the model's chat template, ready for the assistant's next turn."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return list(ids)


def encode_prompt(tok, text: str, chat: bool) -> list[int]:
    """Token ids of `text`, wrapped as a user turn of the chat template when `chat`."""
    if not text:
        raise InvalidArgumentError("empty prompt: pass some text with --prompt")
    if chat:
        return encode_messages(tok, [{"role": "user", "content": text}])
    return tok(text).input_ids


def calibration_prompts(tok, n: int) -> list[list[int]]:
    """The first n calibration prompts as chat-formatted token ids."""
    return [encode_prompt(tok, q, chat=True) for q in CALIBRATION_PROMPTS[:n]]
