"""Bad input through the real command line: every case exits non-zero with a one- or two-line message
that names the flag, config key or file, never a traceback; checks that need no weights run before any
are loaded (with `--verbose`, `generate` announces loading; it must not have got there)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

CLI = [sys.executable, "-m", "spec_jax.cli"]
LOADING = "[spec-jax] loading"


@pytest.fixture(scope="module")
def files(tiny_hf_dir, tmp_path_factory):
    """Every bad file the cases below point to, next to a good tiny model (2 layers, SmolLM2's 49,152-token
    tokenizer)."""
    from spec_jax.models import init_params
    from spec_jax.models.loading import export_hf, load_hf_config
    from spec_jax.models.registry import load_tokenizer

    d = tmp_path_factory.mktemp("bad")
    f = {"tiny": str(tiny_hf_dir), "dir": str(d)}
    cfg = load_hf_config(tiny_hf_dir)
    V = cfg.vocab_size

    def model_variant(name, edit):
        out = d / name
        shutil.copytree(tiny_hf_dir, out)
        edit(out)
        f[name] = str(out)

    def tokenizer_removed(out):
        for p in out.iterdir():
            if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                p.unlink()

    def config_edit(change):
        def edit(out):
            hf = json.loads((out / "config.json").read_text())
            (out / "config.json").write_text(change(hf))
        return edit

    model_variant("notok", tokenizer_removed)
    model_variant("cfglist", config_edit(lambda hf: json.dumps([hf])))
    model_variant("cfgmissing", config_edit(lambda hf: json.dumps({k: v for k, v in hf.items() if k != "hidden_size"})))
    model_variant("cfgbadjson", config_edit(lambda hf: json.dumps(hf)[:-5]))
    model_variant("noweights", lambda out: (out / "model.safetensors").unlink())
    model_variant("truncated", lambda out: (out / "model.safetensors").write_bytes(
        (out / "model.safetensors").read_bytes()[:5000]))
    small = cfg.replace(vocab_size=1000)  # SmolLM2's tokenizer on a 1,000-token model
    f["bigtok"] = str(export_hf(init_params(small, jax.random.key(0)), small, d / "bigtok",
                                tokenizer=load_tokenizer(tiny_hf_dir)))
    (d / "model.txt").write_text("not a model")
    (d / "corrupt.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    f["model.txt"], f["corrupt.gguf"] = str(d / "model.txt"), str(d / "corrupt.gguf")

    def npy(name, a):
        np.save(d / name, a)
        f[name] = str(d / name)

    M = np.zeros((V, 8), np.int32)
    npy("oov.npy", M.copy())
    np.save(d / "oov.npy", np.where(np.arange(V * 8).reshape(V, 8) == 17, 1_000_000, M))
    npy("neg.npy", np.where(np.arange(V * 8).reshape(V, 8) == 9, -1, M))
    npy("shape.npy", np.zeros((V, 4), np.int32))
    npy("float.npy", np.zeros((V, 8), np.float32))
    np.savez(d / "archive.npz", M=M)
    f["archive.npz"] = str(d / "archive.npz")
    (d / "garbage.npy").write_bytes(b"not numpy at all")
    f["garbage.npy"] = str(d / "garbage.npy")
    npy("corpus_oov.npy", np.array([1, 2, V + 5], np.int32))
    npy("corpus_neg.npy", np.array([1, -3, 2], np.int32))
    npy("corpus_2d.npy", np.zeros((2, 2), np.int32))
    for name, data in {"latin1.txt": "caf\xe9 au lait\n".encode("latin-1"),
                       "skip_badjson.json": b'{"skip": [1, ',
                       "skip_wronglayers.json": json.dumps({"skip": [1], "num_layers": 30}).encode(),
                       "skip_oob.json": json.dumps({"skip": [5]}).encode(),
                       "skip_all.json": json.dumps({"skip": [0, 1]}).encode(),
                       "skip_float.json": json.dumps({"skip": [0.5]}).encode(),
                       "empty.jsonl": b"",
                       "corrupt.jsonl.gz": b"\x1f\x8b\x08\x00" + b"\x00" * 40,
                       "latin1.jsonl": '{"turns": ["caf\xe9"]}\n'.encode("latin-1"),
                       "badjson.jsonl": b'{"turns": ["a"]}\n{"turns": [\n',
                       "noturns.jsonl": b'{"question_id": 1, "turns": []}\n',
                       "cfg_type.yaml": b"max-new-tokens: many\n",
                       "cfg_range.yaml": b"method: pld\ndraft-k: 0\n",
                       "cfg_unknown.yaml": b"draft-kk: 3\n",
                       "cfg_badyaml.yaml": b"method: [unclosed\n",
                       "cfg_bool.yaml": b"chat: sometimes\n",
                       "cfg_null.yaml": b"temperature:\n",
                       "cfg_list.yaml": b"- method\n- pld\n",
                       "cfg_choice.yaml": b"method: nope\n",
                       "cfg_float.yaml": b"top-k: 2.5\n",
                       "cfg_latin1.yaml": "prompt: caf\xe9\n".encode("latin-1"),
                       "cfg_bench.yaml": b"max-turns: two\n"}.items():
        (d / name).write_bytes(data)
        f[name] = str(d / name)
    return f


# (argv, what stderr must say). Placeholders: {tiny}, {dir}, and the file names of `files`.
# generate cases run with --model {tiny} unless they give --model, and with --verbose.
GENERATE = [
    (["--max-new-tokens", "0"], r"argument --max-new-tokens: must be an integer >= 1, got 0"),
    (["--max-new-tokens", "abc"], r"--max-new-tokens: expected an integer >= 1, got 'abc'"),
    (["--max-new-tokens", "2.5"], r"--max-new-tokens: expected an integer"),
    (["--temperature", "-1"], r"--temperature: must be a number >= 0.0"),
    (["--temperature", "nan"], r"--temperature: must be a number >= 0.0, got nan"),
    (["--top-p", "0"], r"--top-p: must be a number in \(0.0, 1.0\]"),
    (["--top-p", "1.5"], r"--top-p: must be a number in \(0.0, 1.0\]"),
    (["--top-k", "-1"], r"--top-k: must be an integer >= 0"),
    (["--seed", "-1"], r"--seed: must be an integer in \[0, 2147483647\]"),
    (["--dtype", "float16"], r"--dtype: invalid choice: 'float16'"),
    (["--method", "nope"], r"--method: invalid choice: 'nope'"),
    (["--bogus-flag"], r"unrecognized arguments: --bogus-flag"),
    (["--method", "pld", "--draft-k", "0"], r"--draft-k: must be an integer >= 1, got 0"),
    (["--method", "pld", "--ngram-min", "4", "--ngram-max", "2"], r"--ngram-min 4 > --ngram-max 2"),
    (["--method", "lookahead", "--la-ngram", "1"], r"--la-ngram: must be an integer >= 2"),
    (["--method", "draft_tree", "--tree-width", "5", "--tree-k", "4"], r"--tree-width 5 > --tree-k 4"),
    (["--method", "draft_tree", "--tree-budget", "100"], r"--tree-budget 100 exceeds the 52 candidates"),
    (["--method", "draft", "--draft-layers", "0"], r"--draft-layers: must be an integer >= 1"),
    (["--method", "draft", "--draft-layers", "9"], r"--draft-layers 9: the target has only 2 layers"),
    (["--method", "draft", "--draft-model", "/nonexistent/draft"], r"model '/nonexistent/draft' not found"),
    (["--method", "draft", "--draft-model", "{bigtok}"], r"--draft-model .*bigtok: its vocabulary has 1000 tokens"),
    (["--method", "draft", "--length-policy", "nope"],
     r"--length-policy: must be one of fixed, heuristic, svip, thompson, got 'nope'"),
    (["--method", "token_recycling", "--tr-levels", "4,x"], r"--tr-levels takes comma-separated positive integers"),
    (["--method", "token_recycling", "--tr-levels", "4,0"], r"--tr-levels takes comma-separated positive integers"),
    (["--method", "token_recycling", "--tr-k", "0"], r"--tr-k: must be an integer >= 1"),
    (["--method", "token_recycling", "--tr-matrix", "{oov.npy}"],
     r"oov.npy: token id 1000000 at index \(2, 1\) is outside this model's vocabulary \[0, 49152\)"),
    (["--method", "sam_tr", "--tr-matrix", "{neg.npy}"],
     r"neg.npy: token id -1 at index \(1, 1\) is outside this model's vocabulary \[0, 49152\)"),
    (["--method", "token_recycling", "--tr-matrix", "{shape.npy}"], r"shape.npy: .* has shape \(49152, 4\), expected"),
    (["--method", "token_recycling", "--tr-matrix", "{float.npy}"], r"float.npy: expected a 2-D integer"),
    (["--method", "token_recycling", "--tr-matrix", "{garbage.npy}"], r"garbage.npy: not a token recycling matrix"),
    (["--method", "token_recycling", "--tr-matrix", "/etc/hostname/m.npy"],
     r"--tr-matrix /etc/hostname/m.npy: /etc/hostname is not a directory"),
    (["--method", "token_recycling", "--tr-matrix", "/proc/spec-jax/m.npy"],
     r"--tr-matrix /proc/spec-jax/m.npy: cannot"),
    (["--method", "token_recycling", "--tr-matrix", "{dir}"], r"--tr-matrix .*: is a directory"),
    (["--method", "sam", "--sam-corpus", "{dir}/missing.npy"], r"--sam-corpus .*missing.npy: no such file"),
    (["--method", "sam", "--sam-corpus", "{corpus_oov.npy}"],
     r"corpus_oov.npy: token id 49157 at position 2 is outside this model's vocabulary \[0, 49152\)"),
    (["--method", "sam", "--sam-corpus", "{corpus_neg.npy}"], r"corpus_neg.npy: token id -3 at position 1"),
    (["--method", "sam", "--sam-corpus", "{corpus_2d.npy}"], r"corpus_2d.npy: expected a 1-D integer"),
    (["--method", "sam_tr", "--sam-corpus", "{latin1.txt}"],
     r"latin1.txt:1: the corpus is not UTF-8 text \(byte 0xe9\)"),
    (["--method", "sam", "--sam-min-match", "0"], r"--sam-min-match: must be an integer >= 1"),
    (["--method", "layer_skip"], r"--method layer_skip needs --skip-file"),
    (["--method", "layer_skip", "--skip-file", "{dir}/none.json"], r"--skip-file .*none.json: no such file"),
    (["--method", "layer_skip", "--skip-file", "{skip_badjson.json}"], r"skip_badjson.json: not a skip-set file"),
    (["--method", "layer_skip", "--skip-file", "{skip_wronglayers.json}"], r"skip set is for a 30-layer model"),
    (["--method", "layer_skip", "--skip-file", "{skip_oob.json}"], r"skip_oob.json: layer 5 is outside .* \[0, 2\)"),
    (["--method", "layer_skip", "--skip-file", "{skip_all.json}"], r"skip_all.json: .* keep at least one"),
    (["--method", "layer_skip", "--skip-file", "{skip_float.json}"], r"skip_float.json: not a skip-set file"),
    (["--method", "token_recycling", "--budget", "0"], r"--budget: must be at least 1 node, got 0"),
    (["--method", "token_recycling", "--budget", "lots"], r"--budget: takes a node count or 'auto', got 'lots'"),
    (["--verify", "nope"], r"--verify: invalid choice: 'nope'"),
    (["--method", "pld", "--budget", "4"], r"--budget applies to methods with a prunable static tree \(.*"
                                           r"token_recycling\); pld has none"),
    (["--method", "token_recycling", "--tr-matrix", "{archive.npz}"], r"archive.npz: an .npz archive, not a token"),
    (["--mesh", "data=0"], r"--mesh takes 'auto' or 'data=D,model=M' with positive sizes"),
    (["--mesh", "data=64"], r"--mesh data=64 needs 64 devices but 1 are visible"),
    (["--num-processes", "0"], r"--num-processes: must be an integer >= 1"),
    (["--process-id", "-1"], r"--process-id: must be an integer >= 0"),
    (["--distributed", "--num-processes", "2", "--process-id", "2"], r"--process-id 2 is not below --num-processes 2"),
    (["--num-processes", "2"], r"--coordinator, --num-processes and --process-id need --distributed"),
    (["--max-new-tokens", "5000"], r"--max-new-tokens 5000: the model has 2048 positions"),
    (["--prompt", ""], r"--prompt is empty"),
    (["--prompt", b"caf\xff"], r"--prompt: not valid UTF-8 text \(byte 0xff at character 3\)"),
    (["--model", "/nonexistent/model"], r"model '/nonexistent/model' not found"),
    (["--model", "{model.txt}"], r"model.txt: not a .gguf file nor a Hugging Face model directory"),
    (["--model", "{corrupt.gguf}"], r"corrupt.gguf: cannot parse GGUF"),
    (["--model", "{notok}"], r"notok: no tokenizer files"),
    (["--model", "{cfglist}"], r"cfglist/config.json: expected a JSON object of settings, got a list"),
    (["--model", "{cfgmissing}"], r"cfgmissing/config.json: missing the key 'hidden_size'"),
    (["--model", "{cfgbadjson}"], r"cfgbadjson/config.json: invalid JSON"),
    (["--config", "{dir}/none.yaml"], r"--config .*none.yaml: no such file"),
    (["--config", "{cfg_badyaml.yaml}"], r"cfg_badyaml.yaml is not valid YAML"),
    (["--config", "{cfg_unknown.yaml}"], r"cfg_unknown.yaml: unknown option 'draft-kk'"),
    (["--config", "{cfg_type.yaml}"], r"cfg_type.yaml: max-new-tokens: expected an integer >= 1, got 'many'"),
    (["--config", "{cfg_range.yaml}"], r"cfg_range.yaml: draft-k: must be an integer >= 1, got 0"),
    (["--config", "{cfg_bool.yaml}"], r"cfg_bool.yaml: chat: expected true or false, got 'sometimes'"),
    (["--config", "{cfg_null.yaml}"], r"cfg_null.yaml: temperature: has no value"),
    (["--config", "{cfg_list.yaml}"], r"cfg_list.yaml must be a mapping of option: value"),
    (["--config", "{cfg_choice.yaml}"], r"cfg_choice.yaml: method: must be one of ar, .*got 'nope'"),
    (["--config", "{cfg_float.yaml}"], r"cfg_float.yaml: top-k: expected an integer >= 0, got 2.5"),
    (["--config", "{cfg_latin1.yaml}"], r"cfg_latin1.yaml is not valid YAML"),
]
# Refused only once the model is being loaded (the weights themselves are bad, or the tokenizer, which is
# read first, does not fit the model).
AT_LOADING = [
    (["--model", "{bigtok}"], r"the tokenizer has 49152 tokens but the model's vocab_size is 1000"),
    (["--model", "{noweights}"], r"noweights: no \*.safetensors weights found"),
    (["--model", "{truncated}"], r"truncated/model.safetensors: cannot read safetensors"),
]
BENCH = [
    (["--max-turns", "-1"], r"--max-turns: must be an integer >= 1, got -1"),
    (["--num-prompts", "0"], r"--num-prompts: must be an integer >= 1"),
    (["--per-category", "0"], r"--per-category: must be an integer >= 1"),
    (["--hf-pld-tokens", "0"], r"--hf-pld-tokens: must be an integer >= 1"),
    (["--max-new-tokens", "-5"], r"--max-new-tokens: must be an integer >= 1"),
    (["--out", "/etc/hostname"], r"--out /etc/hostname: exists and is not a directory"),
    (["--out", "/proc/spec-jax-bench"], r"--out /proc/spec-jax-bench: cannot"),
    (["--methods", "nope"], r"--methods: unknown method 'nope'"),
    (["--methods", "pld/draft_k=0"], r"--methods entry 'pld/draft_k=0': --draft-k \(method pld\): must be an integer"),
    (["--methods", "pld/draft_k=x"], r"--methods entry 'pld/draft_k=x': --draft-k \(method pld\): expected an integer"),
    (["--methods", "pld/bogus=1"], r"--methods entry 'pld/bogus=1': unknown option 'bogus'"),
    (["--methods", "pld/draft_k"], r"--methods entry 'pld/draft_k': expected name/option=value"),
    (["--methods", "ar,pld/verify=maybe"], r"--methods entry 'pld/verify=maybe': verify must be one of"),
    (["--methods", ","], r"--methods is empty"),
    (["--methods", "ar,token_recycling", "--budget", "4"], r"--methods entry 'ar': --budget applies to methods"),
    (["--methods", "pld/tr_k=4"], r"--methods entry 'pld/tr_k=4': pld does not take 'tr_k'"),
    (["--methods", "ar,hf_pld/hf_pld_tokens=0"], r"--methods entry 'hf_pld/hf_pld_tokens=0': hf_pld_tokens must be"),
    (["--methods", "token_recycling,sam_tr", "--tr-matrix", "{dir}/m.npy"],
     r"--tr-matrix .*m.npy would be loaded and saved by token_recycling and sam_tr; benchmark them in separate"),
    (["--dataset", "{corrupt.jsonl.gz}"], r"corrupt.jsonl.gz: cannot read"),
    (["--methods", "ar,ar"], r"--methods names 'ar' twice"),
    (["--methods", "ar,token_recycling", "--tr-matrix", "{oov.npy}"],
     r"--methods entry 'token_recycling': .*oov.npy: token id 1000000"),
    (["--methods", "ar,layer_skip"], r"--methods entry 'layer_skip': --method layer_skip needs --skip-file"),
    (["--methods", "ar,hf_assisted", "--draft-layers", "9"], r"--methods entry 'hf_assisted': --draft-layers 9"),
    (["--dataset", "{empty.jsonl}"], r"empty.jsonl has no questions"),
    (["--dataset", "{latin1.jsonl}"], r"latin1.jsonl:1: not UTF-8 text \(byte 0xe9\)"),
    (["--dataset", "{badjson.jsonl}"], r"badjson.jsonl:2: malformed JSON line"),
    (["--dataset", "{noturns.jsonl}"], r"noturns.jsonl:1: 'turns' must be a non-empty list"),
    (["--dataset", "{dir}/none.jsonl"], r"--dataset .*none.jsonl: no such question file"),
    (["--dataset", "mt-bench"], r"unknown dataset 'mt-bench'"),
    (["--max-new-tokens", "1500"], r"needs about \d+ positions \(2 turn\(s\) of --max-new-tokens 1500\)"),
    (["--categories", "nope"], r"unknown category nope; this dataset has: writing"),
    (["--model", "{bigtok}"], r"the tokenizer has 49152 tokens but the model's vocab_size is 1000"),
    (["--config", "{cfg_bench.yaml}"], r"cfg_bench.yaml: max-turns: expected an integer >= 1, got 'two'"),
]
SEARCH_SKIP = [
    (["--out", "/etc/hostname/skip.json"], r"--out /etc/hostname/skip.json: /etc/hostname is not a directory"),
    (["--out", "{dir}"], r"--out .*: is a directory"),
    (["--out", "{dir}/s.json", "--num-prompts", "0"], r"--num-prompts: must be an integer in \[1, "),
    (["--out", "{dir}/s.json", "--num-prompts", "999"], r"--num-prompts: must be an integer in \[1, "),
    (["--out", "{dir}/s.json", "--calib-tokens", "0"], r"--calib-tokens: must be an integer >= 1"),
    (["--out", "{dir}/s.json", "--max-skip", "2"], r"--max-skip 2: the model has 2 layers .* at most 1"),
    (["--num-prompts", "2"], r"the following arguments are required: --out"),
]
OTHER = [
    (["nope"], r"invalid choice: 'nope'"),
    (["generate"], r"the following arguments are required: --prompt"),
]


def _fill(arg, files):
    if isinstance(arg, bytes):
        return arg
    return re.sub(r"\{([^}]+)\}", lambda m: files[m.group(1)], arg)


def _run(argv, files, cwd):
    env = {**os.environ, "SPEC_JAX_CACHE": str(Path(files["dir"]) / "cache")}
    return subprocess.run(CLI + [_fill(a, files) for a in argv], capture_output=True, env=env, cwd=cwd, timeout=300)


def _check(proc, pattern):
    err = proc.stderr.decode("utf-8", "replace")
    if os.environ.get("SPEC_JAX_CASES_LOG"):  # the table of cases and messages, for a report
        with open(os.environ["SPEC_JAX_CASES_LOG"], "a") as f:
            f.write(json.dumps({"argv": [os.fsdecode(a) for a in proc.args[3:]], "rc": proc.returncode,
                                "stderr": err}) + "\n")
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[spec-jax]")]
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 2, err
    assert re.search(pattern, err), f"{pattern!r} not in {err!r}"
    return err


def _with_model(argv):
    return argv if "--model" in argv else [*argv, "--model", "{tiny}"]


@pytest.mark.parametrize("argv,pattern", GENERATE)
def test_generate_refuses_before_loading(files, tmp_path, argv, pattern):
    argv = ["generate", "--verbose", "--prompt", "hi", *_with_model(argv)]
    err = _check(_run(argv, files, tmp_path), pattern)
    assert LOADING not in err, err  # refused before any weights were read
    assert not list(tmp_path.iterdir())  # and nothing written where it ran


@pytest.mark.parametrize("argv,pattern", AT_LOADING)
def test_generate_refuses_bad_models_at_loading(files, tmp_path, argv, pattern):
    _check(_run(["generate", "--verbose", "--prompt", "hi", *argv], files, tmp_path), pattern)


@pytest.mark.parametrize("argv,pattern", BENCH)
def test_bench_refuses_before_running(files, tmp_path, argv, pattern):
    argv = ["bench", "--out", str(tmp_path / "out"), "--methods", "ar", "--num-prompts", "1", *_with_model(argv)]
    err = _check(_run(argv, files, tmp_path), pattern)
    assert "[bench]" not in err  # no method ran
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,pattern", SEARCH_SKIP + OTHER)
def test_other_commands(files, tmp_path, argv, pattern):
    if argv and argv[0] in ("nope", "generate"):
        _check(_run(argv, files, tmp_path), pattern)
    else:
        _check(_run(["search-skip", *_with_model(argv)], files, tmp_path), pattern)
    assert not Path(files["dir"], "s.json").exists()


def test_case_count():
    """The issue asks for at least 60 bad inputs through the CLI."""
    assert len(GENERATE) + len(AT_LOADING) + len(BENCH) + len(SEARCH_SKIP) + len(OTHER) >= 60


def test_yaml_config_keys_parse_like_flags(tmp_path):
    """A valid config's values are converted by the flags' own types (a list joins with commas)."""
    import argparse

    from spec_jax.bench.run import add_bench_args
    from spec_jax.cli import load_config

    p = argparse.ArgumentParser()
    add_bench_args(p)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"methods": ["ar", "pld"], "max-turns": 1, "draft-k": "3"}))
    assert load_config(str(cfg), p) == {"methods": "ar,pld", "max_turns": 1, "draft_k": 3}
