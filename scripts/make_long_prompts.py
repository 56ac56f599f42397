"""Build the long-prompt benchmark set (`spec-jax bench --dataset long`) from documents every install has.

Each question is one instruction over one document that ships with Python or with a dependency of spec-jax,
so nothing is downloaded: sections of the Python language reference (`pydoc_data.topics`), module docstrings
of the standard library, and the Apache-2.0 licence text in jax's distribution. Categories: summarization,
retrieval_qa ("according to the document, ...") and rewriting. Each prompt is 800 to 2,000 tokens under the
embedded SmolLM2 tokenizer's chat template (the default system prompt included); a document longer than
that is cut at the last paragraph break that fits. The output is deterministic: each row records the source
and the SHA-256 of the source text it was built from, so `tests/test_bench.py` can rebuild the rows whose
sources are unchanged on the machine at hand (other Python versions reword some docstrings) and compare.

Run: python scripts/make_long_prompts.py [--out spec_jax/bench/data/long_prompts/question.jsonl]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "spec_jax" / "bench" / "data" / "long_prompts" / "question.jsonl"
MIN_TOKENS, MAX_TOKENS = 800, 2000
FIT_TOKENS = 1900  # documents are cut to fit here, leaving room under MAX_TOKENS for a later tokenizer's drift

# (category, source kind, source name, instruction before the document, question after it or None)
QUESTIONS = [
    ("summarization", "module", "re",
     "Summarise the documentation below for a programmer who has never used regular expressions: what the "
     "module is for, its main functions and its most useful flags. Use at most 200 words.", None),
    ("summarization", "module", "socketserver",
     "Summarise the documentation below: which server classes exist, how they relate to each other, and what "
     "a programmer must write to implement a service.", None),
    ("summarization", "module", "configparser",
     "Summarise the documentation below in one paragraph, then list the parser's constructor options with one "
     "line each.", None),
    ("summarization", "topic", "function",
     "Summarise this section of the Python language reference in five to eight bullet points.", None),
    ("summarization", "license", "jax",
     "Summarise the licence below in plain English: what it lets you do, and what you must do in return. Use a "
     "bulleted list of at most eight points.", None),
    ("retrieval_qa", "topic", "try",
     "Read this section of the Python language reference and answer the question after it.",
     "According to the document, what happens at the end of an \"except\" clause to an exception that was "
     "assigned with \"as\", and why?"),
    ("retrieval_qa", "module", "json",
     "Read the documentation below and answer the question after it.",
     "According to the document, how do you get the most compact JSON encoding, how do you sort the keys of "
     "the output, and how can you decode JSON floats as Decimal values?"),
    ("retrieval_qa", "module", "statistics",
     "Read the documentation below and answer the question after it.",
     "According to the document, which functions measure variability or spread, how can you avoid "
     "recalculating the mean for them, and what exception does the module define?"),
    ("retrieval_qa", "topic", "import",
     "Read this section of the Python language reference and answer the question after it.",
     "According to the document, what two steps does a basic import statement carry out, and which name is "
     "bound in the local namespace when the imported module is not a top-level module?"),
    ("retrieval_qa", "license", "jax",
     "Read the licence below and answer the question after it.",
     "According to the document, when do the patent licenses granted to you terminate, and what must you do "
     "with a NOTICE file when you redistribute the work?"),
    ("rewriting", "topic", "with",
     "Rewrite this section of the Python language reference in plain English for a beginner: keep every rule, "
     "drop the grammar notation, and add one short example.", None),
    ("rewriting", "topic", "raise",
     "Rewrite this section of the Python language reference as a cheat sheet: a bullet list of rules, each "
     "with a one-line code example.", None),
    ("rewriting", "topic", "naming",
     "Rewrite this section of the Python language reference as a FAQ of six to eight questions, each with a "
     "short answer.", None),
    ("rewriting", "module", "fileinput",
     "Rewrite the documentation below as a short tutorial with numbered steps and a worked example.", None),
    ("rewriting", "topic", "objects",
     "Rewrite this section of the Python language reference for a ten-year-old, in short sentences, without "
     "losing any of its facts.", None),
]


def source_text(kind: str, name: str) -> tuple[str, str]:
    """(text, description) of a document shipped with Python or with a dependency of spec-jax."""
    if kind == "module":
        return importlib.import_module(name).__doc__.strip(), f"Python {_py()} standard library: docstring of {name}"
    if kind == "topic":
        from pydoc_data.topics import topics

        return topics[name].strip(), f"Python {_py()} language reference (pydoc_data.topics[{name!r}])"
    if kind == "license":
        dist = importlib.metadata.distribution(name)
        files = sorted((f for f in dist.files or () if f.name.upper().startswith("LICEN")), key=str)
        if not files:
            raise SystemExit(f"no licence file in the {name} distribution")
        return files[0].locate().read_text(encoding="utf-8").strip(), f"the licence file of the {name} distribution"
    raise ValueError(kind)


def _py() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def prompt_text(instruction: str, document: str, question: str | None) -> str:
    return f"{instruction}\n\nDocument:\n\n{document}" + (f"\n\nQuestion: {question}" if question else "")


def fit(tok, instruction: str, document: str, question: str | None) -> str:
    """The document, cut at its last paragraph break (blank line) where the whole prompt fits FIT_TOKENS."""
    paragraphs = document.split("\n\n")
    for n in range(len(paragraphs), 0, -1):
        doc = "\n\n".join(paragraphs[:n])
        if prompt_tokens(tok, prompt_text(instruction, doc, question)) <= FIT_TOKENS:
            return doc
    raise SystemExit(f"even the first paragraph of the document for {instruction[:40]!r} is too long")


def prompt_tokens(tok, text: str) -> int:
    from spec_jax.text import encode_messages

    return len(encode_messages(tok, [{"role": "user", "content": text}]))


def build(tok) -> list[dict]:
    """The question rows, in a fixed order; each prompt's length is checked against MIN_TOKENS..MAX_TOKENS."""
    rows = []
    for n, (category, kind, name, instruction, question) in enumerate(QUESTIONS, 1):
        full, about = source_text(kind, name)
        doc = fit(tok, instruction, full, question)
        text = prompt_text(instruction, doc, question)
        length = prompt_tokens(tok, text)
        if not MIN_TOKENS <= length <= MAX_TOKENS:
            raise SystemExit(f"question {n} ({kind} {name}): {length} tokens, outside {MIN_TOKENS}..{MAX_TOKENS}")
        rows.append({"question_id": n, "category": category, "turns": [text],
                     "source": {"document": about, "sha256": hashlib.sha256(full.encode()).hexdigest(),
                                "cut": doc != full}})
    return rows


def dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    from spec_jax.files import atomic_write_text
    from spec_jax.models.registry import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(OUT), help="question.jsonl to write")
    args = p.parse_args(argv)
    tok = load_tokenizer("smollm2-135m")
    rows = build(tok)
    atomic_write_text(args.out, dumps(rows))
    lengths = [prompt_tokens(tok, r["turns"][0]) for r in rows]
    print(f"{args.out}: {len(rows)} questions, prompt tokens min {min(lengths)} / mean "
          f"{sum(lengths) / len(lengths):.0f} / max {max(lengths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
