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


def test_long_prompts_in_range_and_reproducible():
    """`--dataset long`: 800- to 2,000-token prompts under SmolLM2's chat template, three categories, rebuilt
    identically by scripts/make_long_prompts.py wherever its source documents are the ones it recorded."""
    import importlib.util
    from pathlib import Path

    from spec_jax.models.registry import load_tokenizer

    path = Path(__file__).parents[1] / "scripts" / "make_long_prompts.py"
    spec = importlib.util.spec_from_file_location("make_long_prompts", path)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    rows = load_dataset("long")
    assert 12 <= len(rows) <= 16 and {r["category"] for r in rows} == {"summarization", "retrieval_qa", "rewriting"}
    tok = load_tokenizer("smollm2-135m")
    assert all(make.MIN_TOKENS <= make.prompt_tokens(tok, r["turns"][0]) <= make.MAX_TOKENS for r in rows)
    assert make.OUT.read_text(encoding="utf-8") == make.dumps(rows)  # the file is the script's own output
    same = [(old, new) for old, new in zip(rows, make.build(tok), strict=True)
            if old["source"]["sha256"] == new["source"]["sha256"]]
    if not same:
        pytest.skip("this Python's documents differ from those the file was built from")
    assert all(old == new for old, new in same)


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


def test_batched_bench_matches_batch_one_and_sweeps(tiny_hf_dir, tmp_path):
    """--batch-size 2 over 3 questions (a ragged last batch) and both turns: every method's greedy output is
    the batch-1 output token for token; speed is throughput; the sweep table and plot cover both runs."""
    from spec_jax.bench.report import write_batch_sweep
    from spec_jax.cli import main

    common = ["bench", "--model", str(tiny_hf_dir), "--methods", "ar,token_recycling", "--dataset", "mtbench",
              "--categories", "writing,coding,math", "--per-category", "1", "--max-new-tokens", "12"]
    for b in (1, 2):
        assert main([*common, "--batch-size", str(b), "--out", str(tmp_path / f"b{b}")]) == 0
    for m in ("ar", "token_recycling"):
        rows = {b: [json.loads(line) for line in (tmp_path / f"b{b}" / f"{m}.jsonl").read_text().splitlines()]
                for b in (1, 2)}
        assert [[t["token_ids"] for t in r["turns"]] for r in rows[2]] == \
               [[t["token_ids"] for t in r["turns"]] for r in rows[1]]
        # Batched, the first two questions' turns share a wall time; the third ran alone.
        first, second, third = rows[2]
        assert [t["seconds"] for t in first["turns"]] == [t["seconds"] for t in second["turns"]]
        assert third["turns"][0]["seconds"] != first["turns"][0]["seconds"]
    summary = json.loads((tmp_path / "b2" / "summary.json").read_text())["overall"]
    assert summary["batch_size"] == 2 and summary["methods"]["token_recycling"]["mismatches"] == 0
    ar_rows = [json.loads(line) for line in (tmp_path / "b2" / "ar.jsonl").read_text().splitlines()]
    seconds = ([ar_rows[0]["turns"][t]["seconds"] for t in range(2)] + [ar_rows[2]["turns"][t]["seconds"]
                                                                        for t in range(2)])
    new = sum(t["new_tokens"] for r in ar_rows for t in r["turns"])
    assert summary["methods"]["ar"]["tokens_per_second"] == pytest.approx(new / sum(seconds), rel=1e-3)
    table = write_batch_sweep([tmp_path / "b1", tmp_path / "b2"], tmp_path / "sweep")
    assert "batch 1: tokens/s (x AR)" in table and "| token_recycling |" in table
    assert (tmp_path / "sweep" / "batch_sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DataFormatError, match="same --batch-size"):
        write_batch_sweep([tmp_path / "b1", tmp_path / "b1"], tmp_path / "sweep")


def test_transformers_assisted_peers_refuse_batches(tiny_hf_dir, tmp_path, capsys):
    from spec_jax.cli import main

    assert main(["bench", "--model", str(tiny_hf_dir), "--methods", "ar,hf_pld", "--batch-size", "2",
                 "--num-prompts", "2", "--out", str(tmp_path / "r")]) == 2
    assert "transformers runs hf_pld one sequence at a time" in capsys.readouterr().err


def test_bench_resumes_per_method(tiny_hf_dir, tmp_path, monkeypatch, capfd):
    """A run whose second method was killed, run again with the same settings: the finished method is not run
    again, the other is, and the results equal an uninterrupted run's; other settings are refused, and --fresh
    discards the stored run."""
    import spec_jax.bench.run as bench_run
    from spec_jax.cli import main
    from spec_jax.errors import SpecJaxError

    def command(out, methods="ar,pld", *extra):
        return ["bench", "--model", str(tiny_hf_dir), "--methods", methods, "--dataset", "mtbench", "--categories",
                "writing,coding", "--per-category", "1", "--max-new-tokens", "12", "--out", str(out), *extra]

    def outputs(out, m):
        rows = [json.loads(line) for line in (out / f"{m}.jsonl").read_text().splitlines()]
        return [(r["question_id"], [t["token_ids"] for t in r["turns"]], r.get("tau")) for r in rows]

    assert main(command(tmp_path / "whole")) == 0
    real, ran = bench_run._run_worker, []

    def killed_at_pld(spec):
        ran.append(spec["entry"])
        if spec["entry"] == "pld":
            raise SpecJaxError("the benchmark of pld failed (killed by SIGKILL); its error is above")
        return real(spec)

    monkeypatch.setattr(bench_run, "_run_worker", killed_at_pld)
    out = tmp_path / "resumed"
    assert main(command(out)) == 2 and ran == ["ar", "pld"]
    assert (out / "ar.meta.json").is_file() and not (out / "pld.jsonl").exists()
    capfd.readouterr()
    monkeypatch.setattr(bench_run, "_run_worker", lambda spec: ran.append(spec["entry"]) or real(spec))
    assert main(command(out)) == 0 and ran == ["ar", "pld", "pld"]  # ar was not run again
    assert "ar: complete in" in capfd.readouterr().err
    for m in ("ar", "pld"):
        assert outputs(out, m) == outputs(tmp_path / "whole", m)
    summary = json.loads((out / "summary.json").read_text())["overall"]["methods"]
    assert list(summary) == ["ar", "pld"] and summary["pld"]["mismatches"] == 0
    assert summary["pld"]["tau"] == json.loads((tmp_path / "whole" / "summary.json").read_text()
                                               )["overall"]["methods"]["pld"]["tau"]
    info = json.loads((out / "run.json").read_text())
    assert info["methods"] == ["ar", "pld"] and len(info["resumed"]) == 1
    assert main(command(out)) == 0 and ran == ["ar", "pld", "pld"]  # all complete: nothing runs, summary rebuilt

    assert main(command(out, "ar,pld", "--max-new-tokens", "8")) == 2
    err = capfd.readouterr().err
    assert "holds a run with other settings (options max_new_tokens: 12 -> 8)" in err and "--fresh" in err
    assert main(command(out, "ar", "--fresh")) == 0 and ran[-1] == "ar"
    assert not (out / "pld.jsonl").exists() and "resumed" not in json.loads((out / "run.json").read_text())


ISSUE14 = ("mtbench", "humaneval", "long")


def _issue14_args(part):
    import argparse
    from pathlib import Path

    from spec_jax.bench.run import add_bench_args
    from spec_jax.cli import load_config

    p = argparse.ArgumentParser()
    add_bench_args(p)
    p.set_defaults(**load_config(str(Path(__file__).parents[1] / "configs" / f"bench_issue14_{part}.yaml"), p))
    return p.parse_args([])


def test_issue14_configs_cover_every_method():
    """Every registered method, with --budget auto where its tree can be pruned, plus hf_ar and hf_pld."""
    from spec_jax.bench.run import parse_method
    from spec_jax.drafters.registry import methods

    for part in ISSUE14:
        args = _issue14_args(part)
        parsed = [parse_method(m) for m in args.methods.split(",")]
        ours = [n for n, m in methods().items() if m.module.startswith("spec_jax.")]  # not those of test files
        assert sorted(n for n, _ in parsed) == sorted([*ours, "hf_ar", "hf_pld"])
        assert all((o.get("budget") == "auto") == methods()[n].prunable for n, o in parsed if n in methods())
        assert args.max_new_tokens == 256 and args.out == f"results/issue14/{part}"


@pytest.mark.real_model
def test_issue14_configs_pass_bench_checks():
    from spec_jax.bench.run import check_bench

    sizes = {part: len(check_bench(_issue14_args(part))[2]) for part in ISSUE14}
    assert sizes == {"mtbench": 24, "humaneval": 20, "long": 15}
