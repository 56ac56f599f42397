"""`--budget auto`: the calibrated choice is cached per model, device, drafter and calibration and taken on the
next run without calibrating; a damaged cache entry is measured again with a warning; the step-cost model
(fitted overhead, probes of the chosen tree); the chosen trees decode exactly what AR decodes (greedy)."""

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from spec_jax.cli import main
from spec_jax.decoding import Engine, generate
from spec_jax.decoding import budget as auto
from spec_jax.decoding.setup import check_method_args
from spec_jax.drafters.suffix_automaton import SAMHost, SAMTokenRecycling, SuffixAutomaton
from spec_jax.drafters.token_recycling import TokenRecycling
from spec_jax.models import init_params
from spec_jax.policies.budget import choose_budget, fit_overhead, interpolate_cost, measure_forward_cost
from spec_jax.sampling import Sampling

TR = TokenRecycling(k=4, levels=(4, 6, 4, 2))  # 16 nodes
STEEP = {t: 0.01 * t for t in range(1, 26)}  # every verified token costs a full step: no tree beats AR
MILD = {t: 0.01 * (1 + 0.05 * (t - 1)) for t in range(1, 26)}  # a verified token costs 5% of a step


def _prompts():
    """Prompts with repeated phrases, so recycled successors have something to find."""
    rng = np.random.default_rng(1)
    phrase = rng.integers(3, 256, size=6).tolist()
    return [phrase * 3 + [7, 8], rng.integers(3, 256, size=9).tolist(), phrase + [1] + phrase[:3], phrase * 2 + [5]]


PROMPTS = _prompts()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEC_JAX_CACHE", str(tmp_path))
    return tmp_path / "budget"


@pytest.fixture
def calls(monkeypatch):
    """The drafters calibrated so far (`auto_budget` calibrates only when the cache has no choice)."""
    seen = []
    real = auto.calibrate

    def counted(engine, *args, **kwargs):
        seen.append(engine.drafter.name)
        return real(engine, *args, **kwargs)

    monkeypatch.setattr(auto, "calibrate", counted)
    return seen


def _auto(engine, params, **kw):
    """A quick calibration on a given cost curve (the tiny model's measured steps would not match it), where a
    small tree beats AR."""
    return auto.auto_budget(engine, params, PROMPTS, max_new_tokens=24, cost=MILD, probes=0, **kw)


def test_choice_is_cached_and_taken_on_the_next_run(tiny, cache, calls):
    params, cfg = tiny
    first, r1 = _auto(Engine(cfg, TR), params)
    assert calls == ["token_recycling"] and not r1["cached"]
    assert [str(p) for p in cache.glob("token_recycling-*.json")] == [r1["cache_file"]]
    second, r2 = _auto(Engine(cfg, TR), params)
    assert calls == ["token_recycling"]  # no calibration
    assert r2["cached"] and second.drafter == first.drafter and 0 < r2["nodes"] == r1["nodes"] < TR.shape.nodes
    assert r2["expected_tau"] == pytest.approx(r1["expected_tau"])
    _, r3 = _auto(Engine(cfg, TR), params, recalibrate=True)
    assert len(calls) == 2 and not r3["cached"]
    ar = generate(Engine(cfg), params, PROMPTS, 24).token_ids
    assert generate(second, params, PROMPTS, 24).token_ids == ar


def test_cache_is_keyed_by_method_settings_model_and_sampling(tiny, cache, calls):
    params, cfg = tiny
    other_cfg = cfg.replace(num_layers=2)
    variants = [
        (Engine(cfg, TR), params, {}),
        (Engine(cfg, SAMTokenRecycling(k=4, levels=(4, 6, 4, 2), sam_k=3)), params, {}),  # another method
        (Engine(cfg, SAMTokenRecycling(k=4, levels=(4, 6, 4, 2), sam_k=3,  # the same with a static corpus
                                       host_state=SAMHost(SuffixAutomaton(range(3, 60))))), params, {}),
        (Engine(cfg, dataclasses.replace(TR, levels=(4, 6, 4, 1))), params, {}),  # another tree
        (Engine(cfg, TR), params, {"model_id": "another checkpoint of the same shape"}),
        (Engine(other_cfg, TR), init_params(other_cfg, jax.random.key(3)), {}),  # another model
        (Engine(cfg, TR, sampling=Sampling(temperature=0.7)), params, {}),
    ]
    for engine, p, kw in variants:
        _auto(engine, p, **kw)
    assert len(calls) == len(variants) == len(list(cache.glob("*.json")))
    chosen = []
    for engine, p, kw in variants:  # every one now served from its own entry
        _, report = _auto(engine, p, **kw)
        chosen.append(report["cached"])
    assert all(chosen) and len(calls) == len(variants)


@pytest.mark.parametrize("damage", ["binary", "truncated", "not an object", "rates of another tree", "bad choice"])
def test_damaged_cache_entry_is_measured_again_with_a_warning(tiny, cache, calls, capsys, damage):
    params, cfg = tiny
    _, r1 = _auto(Engine(cfg, TR), params)
    path = Path(r1["cache_file"])
    text = path.read_text()
    entry = json.loads(text)
    path.write_bytes({"binary": b"\xff\xfe\x00garbage", "truncated": text[: len(text) // 2].encode(),
                      "not an object": b"[1, 2]",
                      "rates of another tree": json.dumps({**entry, "rates": [0.5] * 3}).encode(),
                      "bad choice": json.dumps({**entry, "choice": TR.shape.nodes + 1}).encode()}[damage])
    capsys.readouterr()
    engine, r2 = _auto(Engine(cfg, TR), params)
    err = capsys.readouterr().err
    assert f"warning: ignoring the damaged cache file {path}" in err and "measuring the token_recycling budget" in err
    assert len(calls) == 2 and not r2["cached"] and engine.drafter.shape.nodes == r2["nodes"]
    assert 1 <= json.loads(path.read_text())["choice"] <= TR.shape.nodes  # rewritten whole
    assert _auto(Engine(cfg, TR), params)[1]["cached"] and len(calls) == 2


def test_damaged_cost_curve_is_measured_again(tiny, cache, capsys):
    params, cfg = tiny
    measure_forward_cost(params, cfg, sizes=(1, 3), context=16, repeats=1)
    (path,) = cache.glob("*.json")
    path.write_text('{"cost": {"1": "fast"}}')
    again = measure_forward_cost(params, cfg, sizes=(1, 3), context=16, repeats=1)
    assert "ignoring the damaged cache file" in capsys.readouterr().err and set(again) == {1, 3}
    assert set(json.loads(path.read_text())["cost"]) == {"1", "3"}


def test_overhead_fit_recovers_the_step_cost_and_shrinks_the_tree():
    cost = {1: 0.020, 2: 0.022, 4: 0.026, 8: 0.032, 16: 0.047, 32: 0.069, 81: 0.142}
    a, b = 0.003, 0.0008
    steps = {n: interpolate_cost(cost, n + 1) + a + b * n for n in (3, 80)}
    fitted = fit_overhead(steps, cost)
    assert fitted == (pytest.approx(a), pytest.approx(b))
    rates = 0.8 ** np.arange(1, 81)
    bare, _ = choose_budget(rates, cost)
    best, curve = choose_budget(rates, cost, fitted)
    assert best < bare
    want = max(range(1, 81), key=lambda n: (1 + rates[:n].sum()) / (interpolate_cost(cost, n + 1) + a + b * n))
    assert best == want == max(curve, key=lambda c: c["tokens_per_second"])["nodes"]
    # timing noise that would make the extra work shrink as the tree grows is read as a constant
    noisy = {3: interpolate_cost(cost, 4) + 0.010, 80: interpolate_cost(cost, 81) + 0.002}
    assert fit_overhead(noisy, cost) == (pytest.approx(0.006), 0.0)
    # a single measurement (the full tree) is read as work per fed token
    assert fit_overhead({80: interpolate_cost(cost, 81) + 0.0081}, cost) == (pytest.approx(1e-4), pytest.approx(1e-4))


def test_measured_acceptance_of_a_small_tree_scales_the_prediction():
    """A probe that accepted half the predicted tokens at 4 nodes (1 at the full tree, where the rates were
    measured): the expected tau follows the interpolated scale, and the choice moves to a larger tree."""
    cost = {1: 0.020, 41: 0.060}
    rates = 0.85 ** np.arange(1, 41)
    plain, plain_curve = choose_budget(rates, cost)
    scaled, curve = choose_budget(rates, cost, scale={4: 0.5, 40: 1.0})
    for c, p in zip(curve, plain_curve, strict=True):
        s = np.interp(c["nodes"], [4, 40], [0.5, 1.0])
        assert c["expected_tau"] - 1 == pytest.approx(s * (p["expected_tau"] - 1))
    assert scaled > plain


def test_calibration_times_the_chosen_trees_and_stays_greedy_exact(tiny, cache, monkeypatch, capsys):
    """With step times that follow a known model (cost + a + b * nodes, AR's step cost(1) + a), the probes find
    it: the choice is the best of AR and the trees under that model, whatever the first guess was."""
    params, cfg = tiny
    a, b = 0.002, 0.0004
    real = auto.generate

    def timed(engine, *args, **kwargs):  # the real decoding, with the step time the model says
        gen = real(engine, *args, **kwargs)
        n, steps = engine.drafter.shape.nodes, max(gen.target_forwards) - 1
        return dataclasses.replace(gen, seconds=gen.prefill_seconds + steps * (
            interpolate_cost(MILD, n + 1) + a + b * n))

    monkeypatch.setattr(auto, "generate", timed)
    engine, report = auto.auto_budget(Engine(cfg, TR), params, PROMPTS, max_new_tokens=24, cost=MILD,
                                      progress=True)
    assert "budget auto: " in capsys.readouterr().err  # the progress bar says what it does
    rates = np.array(json.loads(Path(report["cache_file"]).read_text())["rates"])
    probes = report["probes"]
    best, curve = choose_budget(rates, MILD, (a, b), scale={p["nodes"]: p["scale"] for p in probes})
    assert report["ar_tokens_per_second"] == pytest.approx(1 / (MILD[1] + a))  # AR timed in the same loop
    assert report["curve"][0] == {"nodes": 0, "expected_tau": 1.0, "tokens_per_second": report["ar_tokens_per_second"]}
    expected = [c["tokens_per_second"] for c in curve]
    assert [c["tokens_per_second"] for c in report["curve"][1:]] == pytest.approx(expected)
    assert report["pays"]
    assert report["nodes"] == engine.drafter.shape.nodes == best > 0
    # the full tree's rates count accepted nodes, its tau committed tokens (a step that reaches the token limit
    # commits fewer than it accepted)
    assert probes[-1]["nodes"] == TR.shape.nodes and 0.5 < probes[-1]["scale"] <= 1.0
    assert 2 <= len(probes) <= 1 + auto.PROBES and all(p["scale"] > 0 for p in probes)
    assert report["overhead_seconds"] == [pytest.approx(a), pytest.approx(b)]
    monkeypatch.setattr(auto, "generate", real)
    ar = generate(Engine(cfg), params, PROMPTS, 24).token_ids
    assert generate(engine, params, PROMPTS, 24).token_ids == ar


def test_no_tree_when_ar_is_measured_faster(tiny, cache, monkeypatch):
    """Where every verified token costs a whole step, AR's measured step beats every tree: the best tree is still
    timed (a probe), then auto chooses no tree and decodes as AR."""
    params, cfg = tiny
    real = auto.generate

    def timed(engine, *args, **kwargs):  # the real decoding, with the step time STEEP says
        gen = real(engine, *args, **kwargs)
        n = engine.drafter.shape.nodes
        return dataclasses.replace(gen, seconds=gen.prefill_seconds + (max(gen.target_forwards) - 1) * STEEP[n + 1])

    monkeypatch.setattr(auto, "generate", timed)
    engine, report = auto.auto_budget(Engine(cfg, TR), params, PROMPTS, max_new_tokens=24, cost=STEEP)
    assert report["nodes"] == 0 and not report["pays"] and engine.drafter.name == "ar"
    assert report["ar_tokens_per_second"] == pytest.approx(1 / STEEP[1])
    assert [p["nodes"] for p in report["probes"]] == [report["best_tree_nodes"], TR.shape.nodes]
    assert report["best_tree_tokens_per_second"] < report["ar_tokens_per_second"]


def test_recalibrate_without_budget_auto_is_reported_as_ignored():
    args = argparse.Namespace(recalibrate=True, budget="6")
    assert any("--recalibrate" in flag for flag in check_method_args("token_recycling", args))
    assert check_method_args("token_recycling", argparse.Namespace(recalibrate=True, budget="auto")) == []


def test_cli_calibrates_once_then_takes_the_cached_choice(tiny_hf_dir, cache, calls, capsys):
    def run(*flags):
        rc = main(["generate", "--model", str(tiny_hf_dir), "--prompt", "one two three one two three",
                   "--max-new-tokens", "12", "--no-phase-timing", "--method", "token_recycling", "--tr-k", "4",
                   "--tr-levels", "4,4,2", "--budget", "auto", *flags])
        out = capsys.readouterr()
        assert rc == 0, out.err
        return out

    first = json.loads(run("--json").out)
    assert calls == ["token_recycling"] and not first["budget"]["cached"]
    plain = run()
    assert calls == ["token_recycling"] and "calibrated earlier for this model, device and method" in plain.err
    second = json.loads(run("--json").out)
    assert second["budget"]["cached"] and second["budget"]["nodes"] == first["budget"]["nodes"]
    third = json.loads(run("--json", "--recalibrate").out)
    assert len(calls) == 2 and not third["budget"]["cached"]
    rc = main(["generate", "--model", str(tiny_hf_dir), "--prompt", "one two three one two three",
               "--max-new-tokens", "12", "--json", "--no-phase-timing"])
    ar = json.loads(capsys.readouterr().out)
    assert rc == 0 and first["token_ids"] == second["token_ids"] == third["token_ids"] == ar["token_ids"]


def test_cost_curve_measures_only_the_sizes_it_lacks(tiny, cache):
    params, cfg = tiny
    measure_forward_cost(params, cfg, sizes=(1, 3), context=16, repeats=1)
    seen = []
    cost = measure_forward_cost(params, cfg, sizes=(1, 3, 5), context=16, repeats=1,
                                on_size=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 1)] and set(cost) == {1, 3, 5} and cost[1] <= cost[3] <= cost[5]
    (path,) = cache.glob("*.json")
    assert set(json.loads(path.read_text())["cost"]) == {"1", "3", "5"}
    assert measure_forward_cost(params, cfg, sizes=(3,), context=16, on_size=seen.append) == {3: cost[3]}
    assert len(seen) == 1


def test_budget_is_chosen_for_the_batch_size(tiny, cache, monkeypatch):
    """At batch N calibration decodes batches of N different prompts (ragged acceptance, as in a real batch), the
    choice is cached per batch size, and the tree decodes AR's text at that batch."""
    params, cfg = tiny
    batches = []
    real = auto.generate

    def recorded(engine, params, prompts, *args, **kwargs):
        batches.append(prompts)
        return real(engine, params, prompts, *args, **kwargs)

    monkeypatch.setattr(auto, "generate", recorded)
    one, at_one = _auto(Engine(cfg, TR), params)
    assert all(len(p) == 1 for p in batches)
    batches.clear()
    two, at_two = _auto(Engine(cfg, TR), params, batch=2)
    groups = {tuple(map(tuple, p)) for p in batches}  # a batch is decoded more than once (compiling, probes, AR)
    assert all(len(g) == 2 and g[0] != g[1] for g in groups)
    assert sorted(p for g in groups for p in g) == sorted(map(tuple, PROMPTS))  # no text in two batches
    assert at_one["batch"] == 1 and at_two["batch"] == 2 and at_one["cache_file"] != at_two["cache_file"]
    monkeypatch.setattr(auto, "generate", real)
    ar = generate(Engine(cfg), params, PROMPTS[:2], 24).token_ids
    assert generate(two, params, PROMPTS[:2], 24).token_ids == ar


@pytest.mark.parametrize("flat", [False, True])
def test_no_tree_when_none_beats_ar(tiny, cache, flat):
    """On a device where every verified token costs a whole step (a large batch on a compute-bound CPU), no tree
    can beat AR and auto decodes without one, as AR (cached like any choice); where verifying more tokens is
    nearly free, the chosen tree does."""
    params, cfg = tiny
    cost = {t: 0.01 * (1 + 0.001 * t) for t in range(1, 26)} if flat else STEEP
    engine, report = auto.auto_budget(Engine(cfg, TR), params, PROMPTS, max_new_tokens=24, cost=cost, probes=0)
    assert report["ar_tokens_per_second"] == pytest.approx(1 / cost[1])  # probes=0: the cost model's AR
    assert report["cost_seconds"] == cost  # what the choice was made on, for plots (notebook 03)
    assert report["pays"] is flat and (report["nodes"] > 0) is flat
    assert report["best_tree_tokens_per_second"] == max(c["tokens_per_second"] for c in report["curve"][1:])
    assert engine.drafter.shape.nodes == report["nodes"] and (engine.drafter.name == "ar") is not flat
    cached, again = auto.auto_budget(Engine(cfg, TR), params, PROMPTS, max_new_tokens=24, cost=cost, probes=0)
    assert again["cached"] and cached.drafter == engine.drafter
    ar = generate(Engine(cfg), params, PROMPTS, 24).token_ids
    assert generate(engine, params, PROMPTS, 24).token_ids == ar


def test_cost_curve_is_measured_and_cached_per_batch_size(tiny, cache):
    params, cfg = tiny
    measure_forward_cost(params, cfg, sizes=(1, 2), context=16, repeats=1)
    cost = measure_forward_cost(params, cfg, sizes=(1, 2), context=16, repeats=1, batch=3)
    assert set(cost) == {1, 2} and len(list(cache.glob("*.json"))) == 2
