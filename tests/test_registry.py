"""The method registry and the drafter contract, through the real command line.

A method defined here, outside the package, plugs in by registering itself: it appears in
`spec-jax methods`, its option becomes a flag, and `generate` and `bench` run it, with no edit to
`cli.py`, `bench/` or the engine.
"""

import dataclasses
import json
import re

import jax.numpy as jnp
import pytest

from spec_jax.cli import main, summary_line
from spec_jax.decoding import Engine, generate
from spec_jax.decoding.verify import verify
from spec_jax.drafters import Built, DraftShape, Option, TemplateDrafter, register
from spec_jax.drafters.layer_skip import LayerSkip
from spec_jax.drafters.registry import methods
from spec_jax.errors import DrafterContractError
from spec_jax.sampling import Sampling
from spec_jax.trees import TreeTemplate


@dataclasses.dataclass(frozen=True)
class RepeatPending(TemplateDrafter):
    """A toy method defined outside the package: drafts the pending token k times."""

    k: int = 3
    name = "repeat_test"

    @property
    def template(self) -> TreeTemplate:
        return TreeTemplate.chain(self.k)

    def propose(self, weights, state, ctx):
        return self.template.build(jnp.repeat(ctx.pending_B[:, None], self.k, axis=1)), state, ctx.cache


@register("repeat_test", "drafts the pending token k times (defined in a test file)",
          options=(Option("repeat_k", int, 3, "tokens drafted per step"),))
def build_repeat(opts, target) -> Built:
    return Built(RepeatPending(k=opts.repeat_k))


PROMPT = "Count: one two three one two three one two"


def _extra(name: str, tmp_path) -> list[str]:
    """Options a tiny two-layer model needs (the defaults are sized for SmolLM2)."""
    if name in ("draft", "draft_tree", "specdecpp"):
        return ["--draft-layers", "1"]
    if name == "layer_skip":
        skip = tmp_path / "skip.json"
        skip.write_text(json.dumps({"skip": [1], "k": 3, "num_layers": 2}))
        return ["--skip-file", str(skip)]
    if name in ("token_recycling", "sam_tr"):
        return ["--tr-levels", "4,4"]
    return []


def _generate_json(capsys, model_dir, *flags) -> dict:
    rc = main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "12", "--json",
               "--no-phase-timing", *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def test_methods_command_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, m in methods().items():
        assert f"{name}: {m.description}" in out
        for opt in m.options:
            assert opt.flag in out
    assert "repeat_test: drafts the pending token" in out and "--repeat-k" in out


@pytest.mark.parametrize("name", list(methods()))
def test_every_method_runs_through_generate_greedy_exact(name, tiny_hf_dir, capsys, tmp_path):
    ar = _generate_json(capsys, tiny_hf_dir)
    out = _generate_json(capsys, tiny_hf_dir, "--method", name, *_extra(name, tmp_path))
    assert out["token_ids"] == ar["token_ids"] and out["method"] == name
    assert out["new_tokens"] == 12


SUMMARY = re.compile(r"\[(\w+)\] (\d+) tokens?: first after ([\d.]+) s \(compile ([\d.]+) s\), "
                     r"(?:then (\d+) in ([\d.]+) s = ([\d.]+) tok/s decoding, )?tau ([\d.]+), (\d+) target forwards")


def test_generate_closing_line_gives_first_token_compilation_and_decoding_apart(tiny_hf_dir, capsys):
    """Without --json, generate ends with the first token's time, the compilation apart, then the tokens
    decoded after it with their time and rate: the JSON's decode_* fields, which leave compilation out."""
    tr = ["--method", "token_recycling", "--tr-levels", "4,4"]
    stats = _generate_json(capsys, tiny_hf_dir, *tr)
    assert stats["decode_tokens"] == stats["new_tokens"] - 1 == 11
    assert stats["first_token_seconds"] <= stats["prefill_seconds"]
    assert stats["decode_seconds"] <= stats["seconds"] - stats["prefill_seconds"] + 1e-3  # 4-digit rounding
    assert stats["decode_tokens_per_second"] == pytest.approx(stats["decode_tokens"] / stats["decode_seconds"],
                                                              rel=1e-2)
    assert stats["tokens_per_second"] == pytest.approx(stats["new_tokens"] / stats["seconds"], rel=1e-2)
    line = summary_line("token_recycling", stats)
    m = SUMMARY.fullmatch(line)
    assert m, line
    assert m.groups() == ("token_recycling", "12", f"{stats['first_token_seconds']:.2f}",
                          f"{stats['compile_seconds']:.1f}", "11", f"{stats['decode_seconds']:.2f}",
                          f"{stats['decode_tokens_per_second']:.1f}", f"{stats['tau']:.2f}",
                          str(stats["target_forwards"]))

    assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", PROMPT, "--max-new-tokens", "12", *tr]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    m = SUMMARY.fullmatch(err[-1])
    assert m, err
    total, decoded, forwards = int(m[2]), int(m[5]), int(m[9])
    assert decoded == total - 1 == 11 and float(m[8]) == pytest.approx(decoded / (forwards - 1), abs=0.01)

    assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", PROMPT, "--max-new-tokens", "1"]) == 0
    m = SUMMARY.fullmatch(capsys.readouterr().err.strip().splitlines()[-1])
    assert m and m[2] == "1" and m[5] is None  # one token: nothing decoded after it


def test_method_from_a_test_file_takes_its_own_flag(tiny_hf_dir, capsys):
    ar = _generate_json(capsys, tiny_hf_dir)
    out = _generate_json(capsys, tiny_hf_dir, "--method", "repeat_test", "--repeat-k", "5")
    assert out["token_ids"] == ar["token_ids"]
    assert len(out["acceptance_by_depth"]) == 5  # the flag reached the builder: a 5-token chain


def test_method_from_a_test_file_runs_in_bench_workers(tiny_hf_dir, tmp_path):
    """Bench workers are separate processes: they import the module that registered the method."""
    rc = main(["bench", "--model", str(tiny_hf_dir), "--methods", "ar,repeat_test/repeat_k=2", "--dataset",
               "mtbench", "--num-prompts", "1", "--max-turns", "1", "--max-new-tokens", "8", "--out",
               str(tmp_path / "out")])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "repeat_test_repeat_k-2.jsonl").read_text().splitlines()]
    ar = [json.loads(line) for line in (tmp_path / "out" / "ar.jsonl").read_text().splitlines()]
    assert rows[0]["turns"][0]["token_ids"] == ar[0]["turns"][0]["token_ids"]


def test_mesh_flag(tiny_hf_dir, capsys):
    ar = _generate_json(capsys, tiny_hf_dir)
    assert _generate_json(capsys, tiny_hf_dir, "--mesh", "data=1,model=1", "--method", "pld")["token_ids"] == \
        ar["token_ids"]
    assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", "x", "--mesh", "data=64"]) == 2
    assert "--mesh data=64 needs 64 devices" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", "x", "--mesh", "rows=2"]) == 2
    assert "--mesh takes 'auto' or 'data=D,model=M'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the contract


@dataclasses.dataclass(frozen=True)
class UnderdeclaredSkip(LayerSkip):
    """Writes the chain's K/V to the target cache like LayerSkip but declares only one scratch slot."""

    @property
    def shape(self) -> DraftShape:
        return DraftShape(nodes=self.policy.k, depth=self.policy.k, target_scratch=1)


@dataclasses.dataclass(frozen=True)
class WrongNodeCount(RepeatPending):
    @property
    def shape(self) -> DraftShape:
        return DraftShape(nodes=self.k + 1, depth=self.k)


@dataclasses.dataclass(frozen=True)
class UnverifiedValidNode(RepeatPending):
    """k children of the root; declares the last one unverified (no target logits there) yet proposes it valid."""

    @property
    def template(self) -> TreeTemplate:
        return TreeTemplate(tuple((r,) for r in range(self.k)))

    @property
    def shape(self) -> DraftShape:
        return DraftShape(nodes=self.k, depth=1, verified=self.k - 1)


@dataclasses.dataclass(frozen=True)
class ObservesVerifiedSlot(UnverifiedValidNode):
    """Proposes its unverified node invalid, but declares the logits `observe` reads at a verified slot."""

    @property
    def observed_logits(self) -> tuple[int, ...]:
        return (1,)

    def propose(self, weights, state, ctx):
        tree, state, cache = super().propose(weights, state, ctx)
        return tree.replace(valid=tree.valid.at[:, -1].set(False)), state, ctx.cache


def test_drafter_with_valid_nodes_or_read_logits_past_its_verified_prefix_is_refused(tiny, prompts):
    params, cfg = tiny
    with pytest.raises(DrafterContractError, match="valid node past the 2 its shape declares verified"):
        generate(Engine(cfg, UnverifiedValidNode(k=3)), params, prompts, 8)
    with pytest.raises(DrafterContractError, match=r"reads logits at slots \[1\]"):
        generate(Engine(cfg, ObservesVerifiedSlot(k=3)), params, prompts, 8)


def test_drafter_writing_undeclared_scratch_is_refused_before_compiling(tiny, prompts):
    from spec_jax.decoding.engine import _jitted

    params, cfg = tiny
    compiled = _jitted.cache_info().currsize
    with pytest.raises(DrafterContractError, match="writes 4 target-cache scratch slots .* target_scratch=1"):
        generate(Engine(cfg, UnderdeclaredSkip(skip=(1, 2))), params, prompts, 8)
    assert _jitted.cache_info().currsize == compiled  # refused before any engine function was compiled
    # Declared honestly, the same drafter runs and is exact.
    ok = generate(Engine(cfg, LayerSkip(skip=(1, 2))), params, prompts, 8).token_ids
    assert ok == generate(Engine(cfg), params, prompts, 8).token_ids


def test_drafter_with_wrong_node_count_is_refused(tiny, prompts):
    params, cfg = tiny
    with pytest.raises(DrafterContractError, match="proposed trees of 3 nodes but its shape declares 4"):
        generate(Engine(cfg, WrongNodeCount(k=3)), params, prompts, 8)


# ----------------------------------------------------------------------------- lossy typical acceptance


def test_typical_acceptance_is_lossy_and_opt_in(tiny_hf_dir, capsys):
    """Medusa-2's rule accepts any child above the entropy-scaled threshold, not only the argmax."""
    import numpy as np

    logits = np.log(np.array([0.6, 0.3, 0.1, 1e-9]))  # H(p) ~ 0.9: threshold min(0.09, 0.3 e^-H) = 0.09
    tree = TreeTemplate(((0,), (1,))).build(jnp.array([[1, 0]], jnp.int32))  # the 0.3 token first
    logits_BxTxV = jnp.asarray(np.tile(logits, (1, 3, 1)), jnp.float32)
    typical = verify(tree, logits_BxTxV, Sampling(), None, 1, mode="typical")
    exact = verify(tree, logits_BxTxV, Sampling(), None, 1)
    assert int(typical.num_accepted_B[0]) == 1 and int(typical.path_BxP[0, 1]) == 1  # took token 1 (p=0.3)
    assert int(exact.num_accepted_B[0]) == 1 and int(exact.path_BxP[0, 1]) == 2  # greedy: only the argmax
    out = _generate_json(capsys, tiny_hf_dir, "--method", "pld", "--verify", "typical")
    assert out["new_tokens"] == 12
    assert main(["generate", "--model", str(tiny_hf_dir), "--prompt", "x", "--verify", "typical",
                 "--max-new-tokens", "2"]) == 0
    assert "LOSSY" in capsys.readouterr().err
