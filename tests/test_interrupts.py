"""Interruptions and failed saves lose nothing: Ctrl-C (SIGINT to the process group, as a terminal sends it)
and SIGTERM end a command with one line and exit 130 or 143, no traceback and no temporary file; results
are printed before side files are saved; a bench keeps the summary of the methods that finished."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

CLI = [sys.executable, "-m", "spec_jax.cli"]
# As a terminal's foreground job: Ctrl-C handled (pytest itself may run in the background of a
# non-interactive shell, where SIGINT is inherited as ignored, and spec-jax leaves an ignored signal alone).
FOREGROUND = [sys.executable, "-c", """
import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["spec-jax", *sys.argv[1:]]
runpy.run_module("spec_jax.cli", run_name="__main__")
"""]
FAILING_METHOD = """
from spec_jax.drafters import register
from spec_jax.errors import InvalidArgumentError


@register("fails_at_run", "passes every check, then fails in its worker (a test of bench's partial summary)")
def build(opts, target):
    raise InvalidArgumentError("fails_at_run cannot run (on purpose)")
"""


class Watched:
    """A CLI process in its own session, its output read as it comes."""

    def __init__(self, argv, env, **kw):
        self.proc = subprocess.Popen(FOREGROUND + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True, **kw)
        self.out, self.err = bytearray(), bytearray()
        self.threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        while chunk := os.read(stream.fileno(), 4096):
            buf.extend(chunk)

    def wait_for(self, stream: str, text: str, timeout: float = 300):
        """Until `text` is in the stream (any output at all for "")."""
        buf = self.out if stream == "out" else self.err
        end = time.monotonic() + timeout
        while (text.encode() not in buf) if text else not buf:
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {text!r}: {bytes(self.err)!r}"
            assert time.monotonic() < end, f"no {text!r} after {timeout}s: {bytes(self.err)!r}"
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        for t in self.threads:
            t.join()
        return rc, bytes(self.out).decode(errors="replace"), bytes(self.err).decode(errors="replace")


LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
sys.argv = ["spec-jax", *sys.argv[1:]]
runpy.run_module("spec_jax.cli", run_name="__main__")
"""


def _env(tmp_path, cache):
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "SPEC_JAX_CACHE": str(cache), "TMPDIR": str(tmp)}


def _assert_stopped(rc, err, signum, tmp_path, out_dir):
    name = signal.Signals(signum).name
    assert rc == 128 + signum, err
    assert "Traceback" not in err, err
    last = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()][-1]
    assert last.startswith(f"spec-jax: interrupted by {name}"), err
    assert not list((tmp_path / "tmpdir").iterdir())  # no temporary file left in $TMPDIR
    leftovers = [p.name for p in out_dir.rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers  # nor a half-written one next to the outputs


@pytest.mark.real_model
@pytest.mark.parametrize("phase,stream,marker", [
    ("loading", "err", "[spec-jax] loading"),
    ("compiling", "err", "[spec-jax] loaded in"),
    ("decoding", "out", ""),  # the streamed answer has begun
])
def test_ctrl_c_during_generate(phase, stream, marker, tmp_path):
    """On the embedded model, whose loading, compiling and decoding each take seconds (a fresh cache makes
    the compile real)."""
    cache = tmp_path / "cache"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    w = Watched(["generate", "--verbose", "--prompt", "Write a long story about a dragon.", "--chat",
                 "--max-new-tokens", "1000", "--method", "token_recycling", "--tr-matrix", str(out_dir / "m.npy")],
                _env(tmp_path, cache))
    w.wait_for(stream, marker)
    os.killpg(w.proc.pid, signal.SIGINT)
    rc, out, err = w.finish()
    _assert_stopped(rc, err, signal.SIGINT, tmp_path, out_dir)
    assert not (out_dir / "m.npy").exists()  # the run did not finish: its side file is not written


def test_sigterm_during_generate(tiny_hf_dir, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    w = Watched(["generate", "--model", str(tiny_hf_dir), "--verbose", "--prompt", "hi",
                 "--max-new-tokens", "1500"], _env(tmp_path, tmp_path / "cache"))
    w.wait_for("err", "[spec-jax] loaded in")
    os.kill(w.proc.pid, signal.SIGTERM)  # as a scheduler sends it: to the process alone
    rc, out, err = w.finish()
    _assert_stopped(rc, err, signal.SIGTERM, tmp_path, out_dir)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_bench(signum, tiny_hf_dir, tmp_path):
    """Ctrl-C reaches the whole process group; SIGTERM only the driver, which stops its worker."""
    out_dir = tmp_path / "out"
    w = Watched(["bench", "--model", str(tiny_hf_dir), "--methods", "ar,pld", "--num-prompts", "4",
                 "--max-new-tokens", "64", "--out", str(out_dir)], _env(tmp_path, tmp_path / "cache"))
    w.wait_for("err", "[bench] ar:")
    w.wait_for("err", "ar:   0%")  # the worker is answering questions
    (os.killpg if signum == signal.SIGINT else os.kill)(w.proc.pid, signum)
    rc, out, err = w.finish()
    _assert_stopped(rc, err, signum, tmp_path, out_dir)
    assert err.count("interrupted") == 1, err  # reported once, by the driver
    assert sorted(p.name for p in out_dir.iterdir()) == ["run.json"]


def test_failed_side_save_keeps_the_results(tiny_hf_dir, tmp_path):
    """The Token Recycling matrix (1.5 MB) cannot be written past a 1 MB file-size limit: the generation
    is printed first, then the save fails with the user's path and a non-zero exit."""
    limited = [sys.executable, "-c", LIMITED]  # the limit set in the child itself (no fork hooks in a JAX process)
    matrix = tmp_path / "out" / "matrix.npy"
    env = {**_env(tmp_path, tmp_path / "cache"), "JAX_ENABLE_COMPILATION_CACHE": "false"}
    proc = subprocess.run(limited + ["generate", "--model", str(tiny_hf_dir), "--prompt", "one two one two",
                                     "--max-new-tokens", "8", "--json", "--method", "token_recycling",
                                     "--tr-matrix", str(matrix)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    result = json.loads(proc.stdout)
    assert result["new_tokens"] == 8 and result["method"] == "token_recycling"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"spec-jax: error: cannot write {matrix}: ") and "Traceback" not in proc.stderr
    assert not matrix.parent.exists() or not list(matrix.parent.iterdir())


def test_bench_keeps_the_summary_of_finished_methods(tiny_hf_dir, tmp_path):
    """A method that passes every check but fails in its worker (registered from a module outside the
    package, `$SPEC_JAX_METHODS`): the methods before it are summarised, and the error says where."""
    (tmp_path / "failing_method.py").write_text(FAILING_METHOD)
    out_dir = tmp_path / "out"
    env = {**_env(tmp_path, tmp_path / "cache"), "SPEC_JAX_METHODS": "failing_method",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    matrix = tmp_path / "tr.npy"
    proc = subprocess.run(CLI + ["bench", "--model", str(tiny_hf_dir), "--methods", "ar,token_recycling,fails_at_run",
                                 "--tr-levels", "4,4", "--tr-matrix", str(matrix), "--num-prompts", "1",
                                 "--max-turns", "1", "--max-new-tokens", "8", "--out", str(out_dir)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "fails_at_run cannot run (on purpose)" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "spec-jax: error: the benchmark of fails_at_run failed (exit 2); its error is above; the summary of ar, "
        f"token_recycling is in {out_dir / 'summary.md'}; run the same command again to run the rest")
    summary = (out_dir / "summary.md").read_text()
    assert "| ar " in proc.stdout and "| ar " in summary and "| token_recycling " in summary
    assert np.load(matrix).any()  # --tr-matrix: what Token Recycling learned is saved after its run
    assert len((out_dir / "ar.jsonl").read_text().splitlines()) == 1
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]


def test_signal_inside_a_gc_callback_still_stops_the_command(capsys):
    """Python swallows an exception raised in a garbage-collector callback (JAX installs one) and prints it
    as 'Exception ignored'; the interrupt must still end the command, with its one line and no traceback."""
    import gc

    from spec_jax.interrupts import run_command

    def raise_signal_in_callback(phase, info):
        if phase == "start":
            gc.callbacks.remove(raise_signal_in_callback)
            signal.raise_signal(signal.SIGTERM)
            for _ in range(100):  # the handler runs here, inside the callback
                pass

    def body():
        gc.callbacks.append(raise_signal_in_callback)
        gc.collect()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return 0

    try:
        assert run_command(body) == 128 + signal.SIGTERM
    finally:
        if raise_signal_in_callback in gc.callbacks:
            gc.callbacks.remove(raise_signal_in_callback)
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err and "Exception ignored" not in err
