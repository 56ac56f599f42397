"""Self-distillation data (`spec_jax.training.data`, `train/make_data.py`): batched answers, the store read back
exactly, resume after SIGKILL identical to an uninterrupted run, benchmark prompts excluded, near-duplicates
removed, damaged shards and unknown config keys refused with clear messages."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from spec_jax.bench.datasets import humaneval, mtbench
from spec_jax.decoding import Engine
from spec_jax.errors import DataFormatError
from spec_jax.models import forward, init_cache
from spec_jax.text import encode_messages
from spec_jax.training import data as D

ROOT = Path(__file__).resolve().parents[1]
GENUINE = ["Describe the water cycle for a ten-year-old.", "List four uses of a paperclip.",
           "Why do cats purr?", "Write a haiku about autumn rain.", "Compare TCP and UDP in two sentences.",
           "How do vaccines train the immune system?", "Suggest a name for a bakery.",
           "What is a monad, informally?", "Translate 'good morning' into French and Spanish.",
           "Give a recipe for pancakes."]


def _load_entry():
    spec = importlib.util.spec_from_file_location("make_data_entry", ROOT / "train" / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def chatty_dir(tmp_path_factory):
    """A tiny random model with SmolLM2's tokenizer that often ends a turn: embedding dimension 0 is large for
    every token, so after the final norm it dominates, and the LM head's column for <|im_end|> reads it. Magpie
    prompt writing then ends turns after a few tokens, as a real chat model does."""
    from spec_jax.models import init_params
    from spec_jax.models.loading import export_hf
    from spec_jax.models.registry import load_tokenizer
    from tests.conftest import TINY

    tok = load_tokenizer("smollm2-135m")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = TINY.replace(vocab_size=len(tok), eos_token_ids=(eot,), max_position_embeddings=2048)
    params = init_params(cfg, jax.random.key(1))
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"].at[:, 0].set(30.0)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[0, eot].set(1.2)
    return export_hf(params, cfg, tmp_path_factory.mktemp("chatty") / "chatty", tokenizer=tok)


@pytest.fixture(scope="module")
def target(tiny_hf_dir):
    from spec_jax.decoding.setup import load_target

    return load_target(tiny_hf_dir, "float32")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_hf_dir, target):
    """A store of 10 file prompts (3 shards of 4, 4, 2) with hidden states and top-k, made in process while
    counting the generate calls."""
    tmp = tmp_path_factory.mktemp("store")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in GENUINE), encoding="utf-8")
    job = D.DataJob(out=str(tmp / "data"), model=str(tiny_hf_dir), prompts=str(prompts), num_prompts=10,
                    max_prompt_tokens=64, max_new_tokens=12, batch_size=4, shard_size=4, hidden_layers=(0, 2),
                    top_k=4, seed=0)
    calls = []
    real = D.generate

    def counting(engine, params, prompts, max_new, **kw):
        calls.append(len(prompts))
        return real(engine, params, prompts, max_new, **kw)

    D.generate = counting
    try:
        summary = D.make_data(job, target=target, progress=False)
    finally:
        D.generate = real
    return job, summary, calls


def test_answers_are_batched_and_read_back_exactly(store, target):
    job, summary, calls = store
    assert summary.samples == 10 and summary.new_samples == 10
    assert calls == [4, 4, 4], calls  # shards of 4, 4 and 2 (padded to 4) prompts: one call each, never one a prompt
    data = D.TrainingData(job.out)
    assert len(data) == 10 and data.seq_len == 76 and data.hidden_layers == (0, 2) and data.top_k == 4
    rows = data.read(range(10))
    tok, params, cfg = target.tokenizer, target.params, target.cfg
    first = encode_messages(tok, [{"role": "user", "content": GENUINE[0]}])
    gen = D.generate(Engine(cfg), params, [first], 12)  # the same greedy answer, unbatched
    expect = first + gen.token_ids[0]
    assert rows["lengths"][0] == len(expect)
    np.testing.assert_array_equal(rows["tokens"][0, : len(expect)], expect)
    assert not rows["tokens"][0, len(expect):].any()
    np.testing.assert_array_equal(np.nonzero(rows["loss_mask"][0])[0], np.arange(len(first), len(expect)))
    for i, text in enumerate(GENUINE):  # prompts in file order, each followed by its answer
        p = encode_messages(tok, [{"role": "user", "content": text}])
        np.testing.assert_array_equal(rows["tokens"][i, : len(p)], p)
        assert rows["loss_mask"][i].sum() == rows["lengths"][i] - len(p) == 12  # tiny model: no EOS
    # Hidden states and top-k equal a fresh teacher-forced forward (bf16 / fp16 storage rounding).
    L = int(rows["lengths"][3])
    out = forward(params, cfg, rows["tokens"][3:4, :L], np.arange(L)[None], init_cache(cfg, 1, L), return_hidden=(0, 2))
    for i in (0, 2):
        np.testing.assert_allclose(rows[f"hidden_{i}"][3, :L].astype(np.float32), np.asarray(out.hidden[i][0]),
                                   rtol=2e-2, atol=2e-2)
        assert not rows[f"hidden_{i}"][3, L:].astype(np.float32).any()
    probs = np.asarray(jax.nn.softmax(out.logits[0], -1))
    np.testing.assert_array_equal(rows["topk_ids"][3, :L], np.argsort(-probs, -1)[:, :4])
    np.testing.assert_allclose(rows["topk_probs"][3, :L].astype(np.float32),
                               np.take_along_axis(probs, rows["topk_ids"][3, :L], -1), rtol=1e-2, atol=1e-4)
    # Batches addressed by step: deterministic, every row once per epoch.
    again = D.TrainingData(job.out, verify=False)
    np.testing.assert_array_equal(again.batch(7, 3)["tokens"], data.batch(7, 3)["tokens"])
    epoch = np.concatenate([data.batch_rows(s, 5, seed=3) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))
    np.testing.assert_array_equal(data.batch(1, 5, seed=3)["tokens"], rows["tokens"][epoch[5:]])


def _make_data_cmd(model, out, *extra):
    return [sys.executable, str(ROOT / "train" / "make_data.py"), "--model", str(model), "--out", str(out),
            "--num-prompts", "16", "--max-prompt-tokens", "48", "--max-new-tokens", "10", "--batch-size", "2",
            "--shard-size", "2", "--hidden-layers", "2", "--top-k", "2", "--temperature", "1.0", "--seed", "5",
            *extra]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, chatty_dir):
    """Magpie prompts, sampled answers, hidden states and top-k: a job SIGKILLed after its first shard and run
    again ends with the same samples, token for token, as a job never interrupted."""
    env = dict(os.environ, SPEC_JAX_CACHE=str(tmp_path / "cache"))
    whole = subprocess.run(_make_data_cmd(chatty_dir, tmp_path / "whole"), env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert whole.stdout.startswith("make_data: 16 samples (16 answered now)"), whole.stdout

    out = tmp_path / "resumed"
    proc = subprocess.Popen(_make_data_cmd(chatty_dir, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest, committed = out / "manifest.json", 0
    deadline = time.monotonic() + 300
    while committed == 0:
        assert proc.poll() is None, "the job ended before its first shard was committed"
        assert time.monotonic() < deadline
        try:
            committed = len(json.loads(manifest.read_text())["shards"])
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(json.loads(manifest.read_text())["shards"])
    assert 1 <= killed_at < 8, f"killed after {killed_at} of 8 shards: the test did not interrupt the job"

    again = subprocess.run(_make_data_cmd(chatty_dir, out), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.startswith(f"make_data: 16 samples ({16 - 2 * killed_at} answered now)"), again.stdout
    a, b = D.TrainingData(tmp_path / "whole"), D.TrainingData(out)
    assert (tmp_path / "whole" / "prompts.jsonl").read_text() == (out / "prompts.jsonl").read_text()
    assert len(a) == len(b) == 16
    ra, rb = a.read(range(16)), b.read(range(16))
    for name in ra:
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "prompts.jsonl"] + [
        f"shard_{i:05d}" for i in range(8)]  # nothing uncommitted left behind
    assert a.manifest["prompts"]["dropped"]["benchmark"] == 0 and ra["loss_mask"].sum() > 0


def test_benchmark_prompts_never_selected(tmp_path, tiny_hf_dir, target):
    """Every MT-Bench turn, HumanEval prompt and Spec-Bench question passed with --exclude is dropped, also when
    re-cased, re-spaced or lightly edited; the genuine prompts around them survive, in order."""
    bench = [t for q in mtbench() for t in q["turns"]] + [q["turns"][0] for q in humaneval()]
    spec = tmp_path / "question.jsonl"
    spec.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["What is the tallest mountain on "
                                                                               "Mars, and how tall is it?"]}) + "\n")
    variants = [bench[0].upper(), "  ".join(bench[5].split()), bench[90] + "!", bench[170].replace("def ", "def  "),
                "what is the TALLEST mountain on Mars and how tall is it"]
    candidates, genuine = [], []
    for i, text in enumerate(bench + variants):
        candidates.append(text)
        if i % 40 == 0:
            genuine.append(GENUINE[(i // 40) % len(GENUINE)])
            candidates.append(genuine[-1])
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in candidates), encoding="utf-8")
    job = D.DataJob(out=str(tmp_path / "out"), model=str(tiny_hf_dir), prompts=str(f), exclude=(str(spec),),
                    num_prompts=1000, max_prompt_tokens=2048)
    filt = D.PromptFilter(D.benchmark_prompts(job.exclude))
    kept = D._select_prompts(job, target.tokenizer, filt, D.check_job(job), None, None, None)
    assert kept == genuine and len(kept) == 9
    assert filt.counts["benchmark"] == len(bench) + len(variants)
    norm = {D.normalise(t) for t in bench}
    assert not any(D.normalise(k) in norm for k in kept)


def test_near_duplicates_removed():
    """Copies up to case, punctuation and spacing always go; longer texts go when their character 5-gram Jaccard
    similarity is >= 0.8 (a short text with a new clause is far enough from the original to stay)."""
    filt = D.PromptFilter(excluded=[])
    long = "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night."
    texts = ["Explain how a rainbow forms.", "explain how a RAINBOW forms", "Explain how a rainbow forms!!",
             "Explain how a rainbow forms in the sky.", long, long.replace("stormy", "windy"),
             long.replace("short story", "short, short story"), "Write a poem about the sea.", "   ",
             "Write a poem about the sea"]
    kept = [t for t in texts if filt.admit(t)]
    assert kept == ["Explain how a rainbow forms.", "Explain how a rainbow forms in the sky.", long,
                    "Write a poem about the sea."]
    assert filt.counts == {"empty": 1, "benchmark": 0, "duplicate": 5}
    idx = D.NearDuplicateIndex()
    idx.add("The quick brown fox jumps over the lazy dog near the river bank today.", "a")
    assert idx.match("The quick brown fox jumps over the lazy dog near the river bank, today!") == "a"
    assert idx.match("A slow green turtle walks under the busy bridge far from the sea.") is None


def _damaged(store, tmp_path, damage):
    job = store[0]
    copy = tmp_path / "copy"
    shutil.copytree(job.out, copy)
    damage(copy)
    with pytest.raises(DataFormatError) as e:
        D.TrainingData(copy)
    return str(e.value)


def test_damaged_shards_refused(store, tmp_path):
    def rows(d):
        m = json.loads((d / "manifest.json").read_text())
        m["shards"][1]["rows"] = 5
        (d / "manifest.json").write_text(json.dumps(m))

    assert "shard shard_00001: the manifest says 5 rows, array 'tokens' has 4" in _damaged(store, tmp_path, rows)
    msg = _damaged(store, tmp_path / "b", lambda d: shutil.rmtree(d / "shard_00002" / "loss_mask"))
    assert "shard shard_00002: array 'loss_mask' is missing" in msg

    def truncate(d):
        chunk = d / "shard_00000" / "hidden_2" / "1.0.0"
        chunk.write_bytes(chunk.read_bytes()[:10])

    msg = _damaged(store, tmp_path / "c", truncate)
    assert "shard shard_00000: array 'hidden_2' cannot be read" in msg and "truncated or corrupt" in msg

    def dtype(d):
        meta = d / "shard_00001" / "lengths" / ".zarray"
        meta.write_text(meta.read_text().replace('"<i4"', '"<i8"'))

    assert "shard shard_00001: array 'lengths' has dtype int64, the manifest says int32" in _damaged(
        store, tmp_path / "d", dtype)

    def lost_chunk(d):  # zarr reads a missing chunk as zeros: only the hash notices
        (d / "shard_00001" / "topk_ids" / "0.0.0").unlink()

    assert "shard shard_00001: content hash mismatch" in _damaged(store, tmp_path / "e", lost_chunk)

    def unfinished(d):
        m = json.loads((d / "manifest.json").read_text())
        m["complete"] = False
        (d / "manifest.json").write_text(json.dumps(m))

    assert "has not finished" in _damaged(store, tmp_path / "f", unfinished)


def test_bad_config_and_flags_refused(tmp_path, capsys):
    entry = _load_entry()
    cfg = tmp_path / "data.yaml"
    cfg.write_text("num_prompts: 4\nmax_new_tokns: 8\n")
    assert entry.main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "unknown option 'max_new_tokns'" in capsys.readouterr().err
    cfg.write_text("batch_size: 0\n")
    assert entry.main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "batch_size: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert entry.main(["--out", str(tmp_path / "o"), "--hidden-layers", "1,x"]) == 2
    assert "--hidden-layers" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nnot \xff utf-8\n")
    assert entry.main(["--out", str(tmp_path / "o"), "--prompts", str(bad)]) == 2
    assert f"{bad}:2: the prompt file is not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # The shipped config names only known options.
    import argparse

    from spec_jax.cli import load_config

    parser = argparse.ArgumentParser()
    D.add_data_args(parser)
    assert load_config(str(ROOT / "configs" / "data_smollm2.yaml"), parser)["hidden_layers"] == (2, 15, 28, 30)


def test_restart_with_other_settings_refused(store, target):
    job = store[0]
    other = D.DataJob(**{**job.__dict__, "max_new_tokens": 13})
    with pytest.raises(D.InvalidArgumentError, match="max_new_tokens: 12 there, 13 now"):
        D.make_data(other, target=target, progress=False)
    assert D.make_data(job, target=target, progress=False).new_samples == 0  # complete: nothing to redo
