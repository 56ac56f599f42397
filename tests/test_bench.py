"""The benchmark suite: dataset loaders and selection, and a small end-to-end run on a tiny model."""

import json

import jax
import pytest

from spec_jax.bench.datasets import humaneval, load_dataset, load_questions, mtbench, select
from spec_jax.errors import DataFormatError, InvalidArgumentError


def test_packaged_prompt_sets():
    mt = mtbench()
    assert len(mt) == 80 and all(len(q["turns"]) == 2 for q in mt)
    assert len({q["category"] for q in mt}) == 8
    he = humaneval()
    assert len(he) == 164 and he[0]["question_id"] == "HumanEval/0" and "def has_close_elements" in he[0]["turns"][0]


def test_spec_bench_file_and_malformed_lines(tmp_path):
    good = tmp_path / "question.jsonl"
    good.write_text('{"question_id": 1, "category": "qa", "turns": ["a?"], "reference": ["b"]}\n'
                    '{"question_id": 2, "category": "math", "turns": ["1+1?", "and 2+2?"]}\n')
    qs = load_dataset(str(good))
    assert [q["category"] for q in qs] == ["qa", "math"] and qs[1]["turns"][1] == "and 2+2?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa", "turns": ["a?"]}\n{"question_id": 2, "turns": [\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: malformed JSON"):
        load_questions(bad)
    no_turns = tmp_path / "no_turns.jsonl"
    no_turns.write_text('{"question_id": 1, "category": "qa", "turns": "a?"}\n')
    with pytest.raises(DataFormatError, match=r"no_turns.jsonl:1: 'turns'"):
        load_questions(no_turns)
    with pytest.raises(DataFormatError, match="unknown dataset"):
        load_dataset("mt-bench")


def test_selection_by_category():
    mt = mtbench()
    two = select(mt, ["writing", "coding"], per_category=2)
    assert [q["category"] for q in two] == ["writing", "writing", "coding", "coding"]
    assert len(select(mt, per_category=1)) == 8 and len(select(mt, limit=5)) == 5
    with pytest.raises(DataFormatError, match="unknown category poetry; this dataset has: writing, roleplay"):
        select(mt, ["poetry"])


def test_unknown_method_refused():
    from spec_jax.bench.run import parse_method

    with pytest.raises(InvalidArgumentError, match="unknown method 'eagle9'.*valid methods: ar, draft"):
        parse_method("eagle9/budget=3")
    # Values stay text here; each method's options convert them (and refuse bad ones) before any run.
    assert parse_method("token_recycling/budget=auto/tr-k=4") == ("token_recycling", {"budget": "auto", "tr_k": "4"})


def test_bench_end_to_end_on_tiny_model(tiny_hf_dir, tmp_path):
    """Two methods, two MT-Bench categories, both turns: JSON lines, Markdown, plots, run record."""
    from spec_jax.cli import main

    out = tmp_path / "res"
    rc = main(["bench", "--model", str(tiny_hf_dir), "--methods", "ar,pld", "--dataset", "mtbench",
               "--categories", "writing,coding", "--per-category", "1", "--max-new-tokens", "12",
               "--out", str(out)])
    assert rc == 0
    rows = {m: [json.loads(line) for line in (out / f"{m}.jsonl").read_text().splitlines()] for m in ("ar", "pld")}
    for rs in rows.values():
        assert [r["category"] for r in rs] == ["writing", "coding"]
        for r in rs:
            assert len(r["turns"]) == 2 and r["turns"][1]["prompt_tokens"] > r["turns"][0]["prompt_tokens"]
            assert abs(r["tokens_per_second"] - r["new_tokens"] / r["seconds"]) < 1e-6
    summary = json.loads((out / "summary.json").read_text())
    ar = summary["overall"]["methods"]["ar"]
    assert ar["speedup"] == pytest.approx(1.0) and ar["tau"] == pytest.approx(1.0) and ar["mismatches"] == 0
    assert summary["overall"]["methods"]["pld"]["mismatches"] == 0  # lossless
    for cat in ("writing", "coding"):
        assert summary["by_category"]["ar"][cat]["speedup"] == pytest.approx(1.0)
    md = (out / "summary.md").read_text()
    assert "| ar | " in md and "| pld | writing | 1 |" in md and "Roofline" in md
    for png in ("speedup_by_category.png", "accepted_length.png", "roofline.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    info = json.loads((out / "run.json").read_text())
    assert info["versions"]["jax"] == jax.__version__ and info["methods"] == ["ar", "pld"]
