"""Self-distillation data for draft heads: prompts, the target's own answers, and a sharded on-disk store.

A data job (`make_data`, `train/make_data.py`) runs in three stages, each deterministic from its settings:

1. Prompts, fixed and ordered up front and saved atomically (`prompts.jsonl`): read from a file (JSON lines
   with `prompt` or `turns`, or plain text one per line), or written by the target itself Magpie-style (fed
   only the chat template's user-turn prefix, it samples a user turn until the end-of-turn token; Xu et al.
   2024, "Magpie"). Near-duplicates are dropped and every prompt of the packaged benchmarks (MT-Bench, both
   turns; HumanEval) and of any Spec-Bench question file passed in is excluded (`NearDuplicateIndex`).
2. Answers: the target answers `batch_size` prompts per `generate` call through the chat template (greedy
   unless a temperature is given); optionally a teacher-forced forward over prompt + answer records hidden
   states of chosen layers (bf16) and the top-k next-token probabilities.
3. Storage: shard i holds prompts [i * shard_size, (i + 1) * shard_size) as zarr arrays written with
   tensorstore into a temporary folder that is renamed into place and then committed by an atomic rewrite
   of `manifest.json` (which lists every committed shard with its rows and a content hash).

Resume is exact: every shard is a pure function of the saved prompts and the settings (its batches, their
padding and their sampling seeds depend only on the shard index), so a job killed at any point and started
again with the same settings skips the committed shards, rewrites the rest, and ends with the same samples
token for token. `TrainingData` reads a finished store and serves batches addressed by step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import re
import shutil
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spec_jax.checks import Range, input_file, output_dir, read_utf8
from spec_jax.decoding import Engine, generate
from spec_jax.errors import DataFormatError, InvalidArgumentError, first_line
from spec_jax.files import atomic_path, atomic_write_text
from spec_jax.models import forward, init_cache
from spec_jax.sampling import Sampling
from spec_jax.text import encode_messages

FORMAT = "spec-jax-distill/1"
MANIFEST = "manifest.json"
PROMPTS = "prompts.jsonl"

# Near-duplicates: Jaccard similarity of character 5-gram sets of the normalised text (NFKC, case-folded,
# punctuation and runs of white space as one space) at or above 0.8. Candidates come from MinHash with
# locality-sensitive hashing (16 bands of 4 rows): a pair at similarity 0.8 becomes a candidate with
# probability 1 - (1 - 0.8^4)^16 > 0.9997, and every candidate is confirmed by its exact Jaccard similarity.
# Identical normalised texts always match (an exact table, not MinHash).
DEDUP_THRESHOLD = 0.8
SHINGLE_CHARS = 5
_BANDS, _ROWS = 16, 4
_PRIME = (1 << 31) - 1


# ---------------------------------------------------------------------------------------------- prompts


def normalise(text: str) -> str:
    """Text as compared for duplicates: NFKC, case-folded, punctuation dropped, white space collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def shingles(norm: str) -> frozenset[str]:
    """Character 5-grams of normalised text (the whole text when shorter)."""
    if len(norm) <= SHINGLE_CHARS:
        return frozenset([norm])
    return frozenset(norm[i: i + SHINGLE_CHARS] for i in range(len(norm) - SHINGLE_CHARS + 1))


class NearDuplicateIndex:
    """Texts seen so far, each with a label; `match(text)` names one whose normalised text is identical or
    whose character 5-gram Jaccard similarity is >= `threshold` (see `DEDUP_THRESHOLD`). Deterministic."""

    def __init__(self, threshold: float = DEDUP_THRESHOLD):
        rng = np.random.default_rng(0x5EED)
        self.threshold = threshold
        self._a = rng.integers(1, _PRIME, size=(_BANDS * _ROWS, 1), dtype=np.uint64)
        self._b = rng.integers(0, _PRIME, size=(_BANDS * _ROWS, 1), dtype=np.uint64)
        self._exact: dict[str, str] = {}
        self._sets: list[tuple[frozenset[str], str]] = []
        self._buckets: dict[tuple[int, bytes], list[int]] = {}

    def _bands(self, sh: frozenset[str]) -> list[tuple[int, bytes]]:
        h = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % _PRIME
                      for s in sorted(sh)], np.uint64)
        sig = ((self._a * h[None] + self._b) % _PRIME).min(axis=1)  # < 2^31 * 2^31: no uint64 overflow
        return [(i, sig[i * _ROWS: (i + 1) * _ROWS].tobytes()) for i in range(_BANDS)]

    def match(self, text: str) -> str | None:
        """The label of an indexed near-duplicate of `text`, or None."""
        norm = normalise(text)
        if norm in self._exact:
            return self._exact[norm]
        sh = shingles(norm)
        for j in sorted({j for key in self._bands(sh) for j in self._buckets.get(key, ())}):
            other, label = self._sets[j]
            if len(sh & other) / len(sh | other) >= self.threshold:
                return label
        return None

    def add(self, text: str, label: str) -> None:
        norm = normalise(text)
        self._exact.setdefault(norm, label)
        sh = shingles(norm)
        for key in self._bands(sh):
            self._buckets.setdefault(key, []).append(len(self._sets))
        self._sets.append((sh, label))


def read_prompt_file(path: str | Path, flag: str = "--prompts") -> list[str]:
    """Prompts of a file: JSON lines (`.jsonl`, `.jsonl.gz`) with a `prompt` string or `turns` (the first
    turn is used), or plain UTF-8 text with one prompt a line; errors name the file and line."""
    from spec_jax.bench.datasets import read_jsonl

    path = input_file(path, flag)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        out = []
        for n, row in enumerate(read_jsonl(path), 1):
            text = row.get("prompt") if isinstance(row, dict) else None
            if text is None and isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
                text = row["turns"][0]
            if not isinstance(text, str):
                raise DataFormatError(f"{path}: object {n}: expected a 'prompt' string or a 'turns' list of strings")
            out.append(text)
    else:
        out = read_utf8(path, "the prompt file").splitlines()
    out = [t for t in out if t.strip()]
    if not out:
        raise DataFormatError(f"{flag} {path}: no prompts in the file")
    return out


def benchmark_prompts(exclude_files: Sequence[str | Path] = ()) -> list[tuple[str, str]]:
    """(label, text) of every prompt that must never be trained on: MT-Bench (both turns), HumanEval, and
    every turn of the Spec-Bench question files given."""
    from spec_jax.bench.datasets import humaneval, load_questions, mtbench

    out = []
    for name, rows in [("mtbench", mtbench()), ("humaneval", humaneval())] + [
            (str(f), load_questions(f)) for f in exclude_files]:
        out += [(f"{name} question {q['question_id']} turn {t + 1}", text)
                for q in rows for t, text in enumerate(q["turns"])]
    return out


@dataclasses.dataclass
class PromptFilter:
    """Admits prompts in order: drops empty ones, benchmark prompts and near-duplicates of either; counts why."""

    excluded: Sequence[tuple[str, str]]
    threshold: float = DEDUP_THRESHOLD
    counts: dict = dataclasses.field(default_factory=lambda: {"empty": 0, "benchmark": 0, "duplicate": 0})

    def __post_init__(self):
        self.index = NearDuplicateIndex(self.threshold)
        for label, text in self.excluded:
            self.index.add(text, "benchmark:" + label)

    def admit(self, text: str, fits: Callable[[str], bool] | None = None) -> bool:
        """Whether `text` is a new prompt that `fits` (then it is indexed, so later near-copies are dropped)."""
        text = text.strip()
        if not normalise(text):
            self.counts["empty"] += 1
            return False
        hit = self.index.match(text)
        if hit is not None:
            self.counts["benchmark" if hit.startswith("benchmark:") else "duplicate"] += 1
            return False
        if fits is not None and not fits(text):
            self.counts["too_long"] = self.counts.get("too_long", 0) + 1
            return False
        self.index.add(text, "prompt")
        return True


def user_turn_prefix(tok) -> tuple[list[int], int]:
    """The chat template's tokens before a user message's content, and its end-of-turn token: rendered with a
    sentinel content and cut there, so any template works (ChatML: `...<|im_start|>user\\n` and `<|im_end|>`)."""
    sentinel = "\u0001SPECJAX\u0001"
    text = tok.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                   add_generation_prompt=True)
    if sentinel not in text:
        raise DataFormatError("the tokenizer's chat template drops the user's message; it cannot write prompts")
    head, tail = text.split(sentinel, 1)
    prefix = tok(head, add_special_tokens=False).input_ids
    after = tok(tail, add_special_tokens=False).input_ids
    if not after or after[0] not in set(tok.all_special_ids):
        raise DataFormatError("the tokenizer's chat template ends a user turn with no special token; pass "
                              "prompts with --prompts instead of having the model write them")
    return list(prefix), int(after[0])


def write_prompts(params, cfg, tok, n: int, filt: PromptFilter, *, seed: int, batch_size: int,
                  max_prompt_tokens: int, temperature: float = 1.0, progress: Callable[[int], None] | None = None,
                  ) -> list[str]:
    """`n` prompts written by the target (Magpie): each batch samples user turns after the template's user-turn
    prefix until the end-of-turn token; a turn cut by the length limit, a benchmark prompt or a near-duplicate
    is dropped. Deterministic in `seed`; refuses after 20 * n samples without n prompts."""
    prefix, eot = user_turn_prefix(tok)
    room = max_prompt_tokens - len(encode_messages(tok, [{"role": "user", "content": "x"}])) + 1
    if room < 4:
        raise InvalidArgumentError(f"--max-prompt-tokens {max_prompt_tokens} leaves no room for a written prompt "
                                   "after the chat template's own tokens; raise it")
    engine = Engine(cfg.replace(eos_token_ids=(eot,)), sampling=Sampling(temperature))
    fits = prompt_fits(tok, max_prompt_tokens)
    out: list[str] = []
    for rnd in range(math.ceil(20 * n / batch_size)):
        gen = generate(engine, params, [prefix] * batch_size, room, seed=_seed(seed, "prompts", rnd))
        for ids in gen.token_ids:
            if len(out) == n or not ids or ids[-1] != eot:  # a turn without its end was cut by the length limit
                continue
            text = tok.decode(ids[:-1], skip_special_tokens=True).strip()
            if filt.admit(text, fits):
                out.append(text)
                if progress is not None:
                    progress(1)
        if len(out) == n:
            return out
    raise InvalidArgumentError(f"the model wrote only {len(out)} distinct prompts of the {n} asked in {20 * n} "
                               "samples; lower --num-prompts, raise --max-prompt-tokens or pass --prompts FILE")


def prompt_fits(tok, max_prompt_tokens: int) -> Callable[[str], bool]:
    """Whether a prompt, wrapped in the chat template, has at most `max_prompt_tokens` tokens."""
    return lambda text: len(encode_messages(tok, [{"role": "user", "content": text}])) <= max_prompt_tokens


def _seed(seed: int, *path) -> int:
    """A 31-bit seed derived from the job's seed and a position (stage, shard, batch): stable across runs."""
    key = hashlib.sha256(json.dumps([seed, *path]).encode()).digest()
    return int.from_bytes(key[:4], "little") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------- answers


@functools.partial(jax.jit, static_argnames=("cfg", "layers", "k"))
def teacher_outputs(params, cfg, tokens_BxL, lengths_B, layers: tuple[int, ...], k: int):
    """Teacher-forced target outputs over whole sequences: hidden states after each of `layers` layers (bf16,
    [B, L, E] each; `cfg.num_layers` is the final residual stream before the norm) and the top-k next-token
    probabilities at every position (softmax at temperature 1: ids [B, L, k] int32, probs float16); positions
    past a sequence's length are zero."""
    B, L = tokens_BxL.shape
    positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
    out = forward(params, cfg, tokens_BxL, positions_BxL, init_cache(cfg, B, L), return_hidden=layers,
                  compute_logits=k > 0)
    valid_BxL = positions_BxL < lengths_B[:, None]
    hidden = {i: jnp.where(valid_BxL[..., None], h, 0).astype(jnp.bfloat16) for i, h in out.hidden.items()}
    if k == 0:
        return hidden, None, None
    probs_BxLxK, ids_BxLxK = jax.lax.top_k(jax.nn.softmax(out.logits.astype(jnp.float32), axis=-1), k)
    return (hidden, jnp.where(valid_BxL[..., None], ids_BxLxK, 0).astype(jnp.int32),
            jnp.where(valid_BxL[..., None], probs_BxLxK, 0).astype(jnp.float16))


def answer_shard(engine: Engine, params, prompts: list[list[int]], *, seq_len: int, max_new_tokens: int,
                 batch_size: int, hidden_layers: tuple[int, ...], top_k: int, seed: int,
                 progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """One shard's arrays: the target answers `prompts` `batch_size` at a time (the last batch padded with
    copies of its last prompt, so every call has one shape), then, if asked, the teacher forward."""
    N = len(prompts)
    arrays = {"tokens": np.zeros((N, seq_len), np.int32), "loss_mask": np.zeros((N, seq_len), np.uint8),
              "lengths": np.zeros((N,), np.int32)}
    for b, start in enumerate(range(0, N, batch_size)):
        batch = prompts[start: start + batch_size]
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        answers = generate(engine, params, padded, max_new_tokens, seed=_seed(seed, "answers", b)).token_ids
        for j, (p, a) in enumerate(zip(batch, answers, strict=False)):
            row = start + j
            arrays["tokens"][row, : len(p) + len(a)] = p + a
            arrays["loss_mask"][row, len(p): len(p) + len(a)] = 1
            arrays["lengths"][row] = len(p) + len(a)
        if progress is not None:
            progress(len(batch))
    if hidden_layers or top_k:
        for i in hidden_layers:
            arrays[f"hidden_{i}"] = np.zeros((N, seq_len, engine.cfg.hidden_size), jnp.bfloat16)
        if top_k:
            arrays["topk_ids"] = np.zeros((N, seq_len, top_k), np.int32)
            arrays["topk_probs"] = np.zeros((N, seq_len, top_k), np.float16)
        for start in range(0, N, batch_size):
            rows = np.arange(start, start + batch_size).clip(max=N - 1)  # one shape: the last batch repeats a row
            hidden, ids, probs = teacher_outputs(params, engine.cfg, arrays["tokens"][rows],
                                                 arrays["lengths"][rows], tuple(hidden_layers), top_k)
            n = min(batch_size, N - start)
            for i, h in hidden.items():
                arrays[f"hidden_{i}"][start: start + n] = np.asarray(h)[:n]
            if top_k:
                arrays["topk_ids"][start: start + n] = np.asarray(ids)[:n]
                arrays["topk_probs"][start: start + n] = np.asarray(probs)[:n]
    return arrays


# ---------------------------------------------------------------------------------------------- storage


def array_specs(seq_len: int, hidden_size: int, hidden_layers: Sequence[int], top_k: int) -> dict[str, dict]:
    """Name -> dtype and per-row shape of every array a shard holds with these settings."""
    specs = {"tokens": {"dtype": "int32", "row": [seq_len]}, "loss_mask": {"dtype": "uint8", "row": [seq_len]},
             "lengths": {"dtype": "int32", "row": []}}
    for i in hidden_layers:
        specs[f"hidden_{i}"] = {"dtype": "bfloat16", "row": [seq_len, hidden_size]}
    if top_k:
        specs["topk_ids"] = {"dtype": "int32", "row": [seq_len, top_k]}
        specs["topk_probs"] = {"dtype": "float16", "row": [seq_len, top_k]}
    return specs


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes (C order), in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.name}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _zarr_spec(path: Path, a: np.ndarray | None = None) -> dict:
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}
    if a is not None:
        # Rows of hidden states and top-k are large: one row a chunk, so a shuffled batch reads only its rows.
        rows = 1 if a.ndim == 3 else min(64, max(a.shape[0], 1))
        dtype = "bfloat16" if a.dtype.name == "bfloat16" else a.dtype.str  # zarr v2 names: "<i4", "|u1", "<f2"
        spec["metadata"] = {"dtype": dtype, "shape": list(a.shape), "chunks": [rows, *a.shape[1:]],
                            "compressor": {"id": "zstd", "level": 3}}
    return spec


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write a shard's arrays as zarr into a temporary sibling folder renamed to `path`; returns its hash."""
    import tensorstore as ts

    with atomic_path(path, directory=True) as tmp:
        for name, a in arrays.items():
            store = ts.open(_zarr_spec(tmp / name, a), create=True).result()
            store.write(a).result()
    return content_hash(arrays)


class TrainingData:
    """A finished data store, checked when opened: every shard the manifest lists must hold each array with
    the manifest's rows, dtype and row shape, and (with `verify`, reading everything once) the content hash
    the job recorded; anything else is a `DataFormatError` naming the shard and what is wrong.

    Rows are numbered across shards in order. `batch(step, batch_size)` is the batch a training loop takes at
    step `step`: a pure function of (step, batch_size, seed), so a resumed run reads the same batches.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        m = self.manifest
        if not m.get("complete"):
            raise DataFormatError(f"{self.path}: the data job has not finished ({len(m['shards'])} shards committed); "
                                  "run the same make_data command again to complete it")
        self.specs = m["arrays"]
        self.stores, self.rows = [], []
        for entry in m["shards"]:
            self.stores.append(self._open_shard(entry, verify))
            self.rows.append(int(entry["rows"]))
        self.offsets = np.cumsum([0, *self.rows])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["settings"]["seq_len"])

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["settings"]["hidden_layers"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["settings"]["top_k"])

    def _open_shard(self, entry: dict, verify: bool) -> dict:
        import tensorstore as ts

        name, rows = entry["name"], int(entry["rows"])
        where = f"{self.path}: shard {name}"
        if not (self.path / name).is_dir():
            raise DataFormatError(f"{where}: the folder is missing; rerun the data job into a new --out")
        stores = {}
        for arr, spec in self.specs.items():
            if not (self.path / name / arr / ".zarray").is_file():
                raise DataFormatError(f"{where}: array {arr!r} is missing")
            try:
                store = ts.open(_zarr_spec(self.path / name / arr), open=True).result()
            except Exception as e:  # noqa: BLE001 (tensorstore raises ValueError and its own errors)
                raise DataFormatError(f"{where}: array {arr!r} cannot be opened ({first_line(e)})") from None
            if store.dtype.name != spec["dtype"]:
                raise DataFormatError(f"{where}: array {arr!r} has dtype {store.dtype.name}, the manifest says "
                                      f"{spec['dtype']}")
            shape = list(store.shape)
            if shape[0] != rows:
                raise DataFormatError(f"{where}: the manifest says {rows} rows, array {arr!r} has {shape[0]}")
            if shape[1:] != spec["row"]:
                raise DataFormatError(f"{where}: array {arr!r} has rows of shape {shape[1:]}, the manifest says "
                                      f"{spec['row']}")
            stores[arr] = store
        if verify:
            got = content_hash({arr: self._read(name, arr, s, None) for arr, s in stores.items()})
            if got != entry["sha256"]:
                raise DataFormatError(f"{where}: content hash mismatch (the shard was changed or damaged after it "
                                      "was written); delete the data folder and run the data job again")
        return stores

    def _read(self, shard: str, arr: str, store, local_rows) -> np.ndarray:
        try:
            view = store if local_rows is None else store.oindex[np.asarray(local_rows, np.int64)]
            return np.asarray(view.read().result())
        except Exception as e:  # noqa: BLE001 (a truncated or garbled chunk fails to decode)
            raise DataFormatError(f"{self.path}: shard {shard}: array {arr!r} cannot be read ({first_line(e)}); "
                                  "the shard is truncated or corrupt") from None

    def read(self, rows: Iterable[int], arrays: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Every array (or those named in `arrays`) at the given global rows, in the given order."""
        rows_R = np.asarray(list(rows), np.int64)
        if rows_R.size and (rows_R.min() < 0 or rows_R.max() >= len(self)):
            raise InvalidArgumentError(f"rows must be in [0, {len(self)}), got {rows_R.min()}..{rows_R.max()}")
        shard_R = np.searchsorted(self.offsets, rows_R, side="right") - 1
        names = list(self.specs) if arrays is None else list(arrays)
        unknown = sorted(set(names) - set(self.specs))
        if unknown:
            raise DataFormatError(f"{self.path}: no array {', '.join(map(repr, unknown))} (it has "
                                  f"{', '.join(self.specs)}); make the data with the settings this recipe needs")
        out = {arr: np.zeros((len(rows_R), *self.specs[arr]["row"]), _np_dtype(self.specs[arr]["dtype"]))
               for arr in names}
        for s in np.unique(shard_R):
            sel = np.nonzero(shard_R == s)[0]
            local, inverse = np.unique(rows_R[sel] - self.offsets[s], return_inverse=True)
            for arr in names:
                store = self.stores[s][arr]
                out[arr][sel] = self._read(self.manifest["shards"][s]["name"], arr, store, local)[inverse]
        return out

    def batch_rows(self, step: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                   limit: int | None = None) -> np.ndarray:
        """The global rows of batch `step`: consecutive slices of one permutation per epoch (seeded by seed
        and epoch), so every row is seen once per epoch and the order never depends on earlier calls. With
        `limit`, only rows [0, limit) are drawn (the rest held out for evaluation)."""
        n = len(self) if limit is None else limit
        if not 0 < n <= len(self):
            raise InvalidArgumentError(f"limit must be in [1, {len(self)}], got {limit}")
        i_B = step * batch_size + np.arange(batch_size)
        epoch_B, pos_B = np.divmod(i_B, n)
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epoch_B):
            order = np.random.default_rng([seed, int(e)]).permutation(n) if shuffle else np.arange(n)
            out[epoch_B == e] = order[pos_B[epoch_B == e]]
        return out

    def batch(self, step: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> dict[str, np.ndarray]:
        """The arrays of batch `step` (see `batch_rows`): tokens [B, L], loss_mask [B, L], lengths [B], and
        hidden_<i> [B, L, E], topk_ids / topk_probs [B, L, k] where the store has them."""
        return self.read(self.batch_rows(step, batch_size, seed, shuffle))


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _read_manifest(path: Path) -> dict:
    f = path / MANIFEST
    if not f.is_file():
        raise DataFormatError(f"{path}: no {MANIFEST}; not a spec-jax training data folder (make one with "
                              "train/make_data.py)")
    try:
        m = json.loads(read_utf8(f, "the manifest"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{f}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise DataFormatError(f"{f}: not a {FORMAT} manifest (format {got!r})")
    for key in ("settings", "arrays", "shards"):
        if key not in m:
            raise DataFormatError(f"{f}: the manifest has no {key!r}")
    return m


# ---------------------------------------------------------------------------------------------- the job


@dataclasses.dataclass(frozen=True)
class DataJob:
    """The settings of one data job; all but `out` define its samples (a restart must repeat them)."""

    out: str
    model: str = "smollm2-135m"
    dtype: str = "float32"
    prompts: str | None = None  # a prompt file; None: the target writes them (Magpie)
    exclude: tuple[str, ...] = ()  # Spec-Bench question files whose prompts must not be trained on
    num_prompts: int = 256  # a file: its first admitted prompts, in order
    max_prompt_tokens: int = 256
    max_new_tokens: int = 256
    batch_size: int = 8
    shard_size: int = 64
    hidden_layers: tuple[int, ...] = ()
    top_k: int = 0
    seed: int = 0
    temperature: float = 0.0  # answers; 0 is greedy
    top_p: float = 1.0
    prompt_temperature: float = 1.0  # Magpie prompt writing

    @property
    def seq_len(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens

    def settings(self) -> dict:
        """What a restart must match, with hashes of the input files (a changed file changes the samples)."""
        s = {k: v for k, v in dataclasses.asdict(self).items() if k != "out"}
        s.update(hidden_layers=list(self.hidden_layers), exclude=[_file_record(f) for f in self.exclude],
                 prompts=None if self.prompts is None else _file_record(self.prompts), seq_len=self.seq_len,
                 dedup_threshold=DEDUP_THRESHOLD)
        return s


def _file_record(path: str) -> dict:
    return {"path": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


@dataclasses.dataclass
class Summary:
    samples: int  # rows in the finished store
    new_samples: int  # answered by this run
    answer_tokens: int  # generated by this run
    seconds: float  # answering (generation, teacher forward, writing)
    total_seconds: float  # the whole job: loading, prompts, compiling included
    out: Path

    def line(self) -> str:
        tps = self.answer_tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"make_data: {self.samples} samples ({self.new_samples} answered now), {self.answer_tokens} answer "
                f"tokens in {self.seconds:.1f}s ({self.total_seconds:.1f}s in all), {tps:.1f} tokens/s -> "
                f"{self.out / MANIFEST}")


def check_job(job: DataJob) -> list[str] | None:
    """Refuse bad settings that need no model: the output folder, the exclusion files, and the prompt file (read
    and checked here: UTF-8, format); returns the file's prompts when one is given."""
    output_dir(job.out, "--out")
    out = Path(job.out)
    if out.is_dir() and not (out / MANIFEST).exists():
        stray = [p.name for p in out.iterdir() if p.name != PROMPTS and not p.name.startswith(".")]
        if stray:
            raise InvalidArgumentError(f"--out {job.out}: the folder holds other files ({', '.join(sorted(stray)[:3])})"
                                       " and no manifest.json; choose an empty or new folder")
    for f in job.exclude:
        input_file(f, "--exclude")
    return read_prompt_file(job.prompts) if job.prompts is not None else None


def check_job_model(job: DataJob, cfg) -> None:
    """Refuse settings the model cannot serve (read from its header, before the weights load)."""
    bad = [i for i in job.hidden_layers if not 0 <= i <= cfg.num_layers]
    if bad:
        raise InvalidArgumentError(f"--hidden-layers {bad[0]}: the model has {cfg.num_layers} layers; use 0 "
                                   f"(the embeddings) to {cfg.num_layers} (the last layer's output)")
    if job.seq_len + 1 > cfg.max_position_embeddings:
        raise InvalidArgumentError(f"--max-prompt-tokens {job.max_prompt_tokens} + --max-new-tokens "
                                   f"{job.max_new_tokens} exceed the model's {cfg.max_position_embeddings} "
                                   "positions; lower them")
    if job.top_k > cfg.vocab_size:
        raise InvalidArgumentError(f"--top-k {job.top_k}: the model's vocabulary has {cfg.vocab_size} tokens")


def make_data(job: DataJob, target=None, progress: bool = True) -> Summary:
    """Run (or resume) a data job; `target` (`registry.Target`) is loaded from `job.model` when not given."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    file_prompts = check_job(job)
    out = Path(job.out)
    settings = job.settings()
    manifest = _resume_manifest(out, settings)
    if manifest is not None and manifest["complete"]:
        return Summary(manifest["rows"], 0, 0, 0.0, time.perf_counter() - t0, out)
    if target is None:
        from spec_jax.decoding.setup import load_target

        target = load_target(job.model, job.dtype)
    params, cfg, tok = target.params, target.cfg, target.tokenizer
    check_job_model(job, cfg)

    prompts = _load_saved_prompts(out, manifest)
    if prompts is None:
        filt = PromptFilter(benchmark_prompts(job.exclude))
        with tqdm(total=job.num_prompts, desc="writing prompts", disable=not progress or file_prompts is not None,
                  file=sys.stderr) as bar:
            prompts = _select_prompts(job, tok, filt, file_prompts, params, cfg, bar.update)
        if not prompts:
            raise DataFormatError(f"--prompts {job.prompts}: no prompt is left after removing benchmark prompts, "
                                  f"duplicates and prompts over --max-prompt-tokens ({filt.counts})")
        text = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
        atomic_write_text(out / PROMPTS, text)
        manifest = {"format": FORMAT, "model": str(job.model), "settings": settings,
                    "prompts": {"file": PROMPTS, "count": len(prompts), "sha256": _sha(text),
                                "dropped": filt.counts},
                    "arrays": array_specs(job.seq_len, cfg.hidden_size, job.hidden_layers, job.top_k),
                    "shards": [], "rows": 0, "complete": False}
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    _clean(out, manifest)

    encoded = [encode_messages(tok, [{"role": "user", "content": p}]) for p in prompts]
    engine = Engine(cfg, sampling=Sampling(job.temperature, 0, job.top_p))
    num_shards = math.ceil(len(prompts) / job.shard_size)
    done = len(manifest["shards"])
    t_answer, new, tokens = time.perf_counter(), 0, 0
    with tqdm(total=len(prompts), initial=min(done * job.shard_size, len(prompts)), desc="answering",
              unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for s in range(done, num_shards):
            chunk = encoded[s * job.shard_size: (s + 1) * job.shard_size]
            arrays = answer_shard(engine, params, chunk, seq_len=job.seq_len, max_new_tokens=job.max_new_tokens,
                                  batch_size=job.batch_size, hidden_layers=job.hidden_layers, top_k=job.top_k,
                                  seed=_seed(job.seed, "shard", s), progress=bar.update)
            name = f"shard_{s:05d}"
            digest = write_shard(out / name, arrays)
            manifest["shards"].append({"name": name, "rows": len(chunk), "first_prompt": s * job.shard_size,
                                       "answer_tokens": int(arrays["loss_mask"].sum()), "sha256": digest})
            manifest["rows"] += len(chunk)
            manifest["complete"] = s == num_shards - 1
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))  # the commit point of the shard
            new += len(chunk)
            tokens += int(arrays["loss_mask"].sum())
    return Summary(manifest["rows"], new, tokens, time.perf_counter() - t_answer, time.perf_counter() - t0, out)


def _select_prompts(job: DataJob, tok, filt: PromptFilter, file_prompts, params, cfg, progress) -> list[str]:
    """The job's prompts in order: the file's admitted ones that fit `max_prompt_tokens`, or Magpie's."""
    if file_prompts is None:
        return write_prompts(params, cfg, tok, job.num_prompts, filt, seed=_seed(job.seed, "magpie"),
                             batch_size=job.batch_size, max_prompt_tokens=job.max_prompt_tokens,
                             temperature=job.prompt_temperature, progress=progress)
    fits = prompt_fits(tok, job.max_prompt_tokens)
    out = []
    for text in file_prompts:
        if len(out) == job.num_prompts:
            break
        if filt.admit(text, fits):
            out.append(text.strip())
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _resume_manifest(out: Path, settings: dict) -> dict | None:
    """The manifest of an earlier run of this job, refused when its settings differ."""
    if not (out / MANIFEST).exists():
        return None
    m = _read_manifest(out)
    if m["settings"] != settings:
        diff = [k for k in sorted(set(m["settings"]) | set(settings)) if m["settings"].get(k) != settings.get(k)]
        k = diff[0]
        raise InvalidArgumentError(f"--out {out} holds data made with other settings ({k}: "
                                   f"{json.dumps(m['settings'].get(k))} there, {json.dumps(settings.get(k))} now); "
                                   "repeat that command to resume it or choose another --out")
    return m


def _load_saved_prompts(out: Path, manifest: dict | None) -> list[str] | None:
    """The prompts an earlier run saved, when the manifest vouches for them."""
    if manifest is None:
        return None
    f = out / manifest["prompts"]["file"]
    text = read_utf8(f, "the prompt list") if f.is_file() else None
    if text is None or _sha(text) != manifest["prompts"]["sha256"]:
        raise DataFormatError(f"{f}: missing or changed since the data job saved it; choose a new --out")
    return [json.loads(line)["prompt"] for line in text.splitlines()]


def _clean(out: Path, manifest: dict) -> None:
    """Remove what an interrupted run left uncommitted: temporary folders and shards the manifest lacks."""
    committed = {s["name"] for s in manifest["shards"]}
    for p in out.iterdir():
        if (p.name.startswith(".") and p.is_dir()) or (p.name.startswith("shard_") and p.name not in committed):
            shutil.rmtree(p)
        elif p.name.startswith(".") and p.is_file():
            p.unlink()


# ---------------------------------------------------------------------------------------------- command line


def layer_list(text: str) -> tuple[int, ...]:
    """`--hidden-layers 2,15,30`: distinct residual-stream depths >= 0 (checked against the model later)."""
    if not str(text).strip():
        return ()
    try:
        layers = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None
    if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"expected distinct layer numbers >= 0, got {text!r}")
    return tuple(sorted(layers))


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data job's flags (each range checked as it is parsed, also from a YAML config)."""
    p.add_argument("--config", help="YAML file of option defaults (configs/data_*.yaml); flags win")
    p.add_argument("--model", default="smollm2-135m", help="short name, Hugging Face directory or .gguf file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", help="the data folder, required (an interrupted job resumes into it)")
    p.add_argument("--prompts", help="prompt file: .jsonl with 'prompt' or 'turns', or text one per line "
                                     "(default: the target writes its prompts, Magpie-style)")
    p.add_argument("--exclude", action="append", default=[],
                   help="a Spec-Bench question.jsonl whose prompts must not be trained on (repeatable; MT-Bench "
                        "and HumanEval are always excluded)")
    p.add_argument("--num-prompts", type=Range(int, 1), default=256, help="prompts to answer")
    p.add_argument("--max-prompt-tokens", type=Range(int, 8), default=256,
                   help="longest prompt, chat template included (longer ones are dropped)")
    p.add_argument("--max-new-tokens", type=Range(int, 1), default=256, help="longest answer")
    p.add_argument("--batch-size", type=Range(int, 1), default=8, help="prompts per generate call")
    p.add_argument("--shard-size", type=Range(int, 1), default=64, help="samples per shard")
    p.add_argument("--hidden-layers", type=layer_list, default=(),
                   help="store the target's hidden states after these layers (comma-separated, bf16)")
    p.add_argument("--top-k", type=Range(int, 0), default=0, help="store the target's top-k probabilities (0: none)")
    p.add_argument("--seed", type=Range(int, 0), default=0)
    p.add_argument("--temperature", type=Range(float, 0), default=0.0, help="answer sampling (0: greedy)")
    p.add_argument("--top-p", type=Range(float, 0, 1, min_open=True), default=1.0)
    p.add_argument("--prompt-temperature", type=Range(float, 0, min_open=True), default=1.0,
                   help="sampling temperature when the target writes prompts")


def job_from_args(args) -> DataJob:
    return DataJob(out=args.out, model=args.model, dtype=args.dtype, prompts=args.prompts,
                   exclude=tuple(args.exclude), num_prompts=args.num_prompts, max_prompt_tokens=args.max_prompt_tokens,
                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, shard_size=args.shard_size,
                   hidden_layers=tuple(args.hidden_layers), top_k=args.top_k, seed=args.seed,
                   temperature=args.temperature, top_p=args.top_p, prompt_temperature=args.prompt_temperature)


def cmd_make_data(args) -> int:
    """Check everything that needs no weights, then run the job and print its one-line summary."""
    from spec_jax.decoding.setup import check_model, enable_compilation_cache

    if not args.out:
        raise InvalidArgumentError("--out is required: the folder to write the data into")
    job = job_from_args(args)
    check_job(job)
    check_job_model(job, check_model(job.model, job.dtype))
    enable_compilation_cache()
    print(make_data(job).line(), flush=True)
    return 0
