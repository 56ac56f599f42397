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
    # more for --budget auto at a batch size above one (a batch of different prompts per calibration run)
    "Describe the water cycle to a ten-year-old.",
    "Write a SQL query that returns the five most recent orders of each customer.",
    "What are the pros and cons of working from home?",
    "Explain what a hash table is and when to use one.",
    "Draft a polite email asking a colleague to review a report by Friday.",
    "How does compound interest work? Give an example.",
    "Write a JavaScript function that removes duplicates from an array.",
    "List five healthy breakfast ideas and say why each is good.",
    "Explain the difference between weather and climate.",
    "Write a haiku about autumn leaves.",
    "What causes the seasons on Earth?",
    "Give step-by-step instructions for making a cup of tea.",
    "Explain recursion with a simple example in Python.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "What is photosynthesis and why does it matter?",
    "Suggest a weekend itinerary for a first visit to Paris.",
    "Write a bash command that counts the lines in every .py file of a folder.",
    "Why is the sky blue?",
    "Explain the rules of chess for a complete beginner.",
    "Write a short story opening set on a train at night.",
    "What is the difference between TCP and UDP?",
    "Give advice to someone preparing for a job interview.",
    "Explain how a bill becomes a law in a parliamentary democracy.",
    "Write a Python class for a simple bank account with deposits and withdrawals.",
    "Compare electric cars and petrol cars in a short table.",
    "What is machine learning, in plain words?",
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
