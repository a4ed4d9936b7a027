"""`rvc-serve batch`: many files through the service, resumable, with progress and a summary.

Inputs are the wav/mp3/flac files under a folder (recursively) or the files a list names (one
path a line, relative to the list's folder). Each output mirrors its input's path under the
output folder with the format's suffix; two inputs of one folder with the same stem (`x.wav`,
`x.flac`) keep their full names instead (`x.wav.mp3`, `x.flac.mp3`). With several voices, each
voice's outputs mirror the inputs under a folder named for it, and each input's conversions are
sent one after the other, so they run together and the service computes the input's features
and pitch once for all of them (its input cache).

A JSONL manifest in the output folder records every item that ended, done or failed (with its
reason), with the settings used. A rerun skips the inputs recorded done with the same settings
whose output is there, and tries the rest. Outputs are written aside and renamed into place;
an existing output is never replaced unless `overwrite` is set.

The conversion itself is a `Backend`: over HTTP with `rvc_client` (here), or through the
application's Serve handle (deployments/batch_ray.py, imported only in that mode: this module
needs no Ray).
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import soundfile as sf
from tqdm import tqdm

from rvc_client import Client
from rvc_client.files import PARTIAL_MARK

INPUT_SUFFIXES = (".wav", ".mp3", ".flac")
OUTPUT_FORMATS = ("mp3", "flac", "wav")
MANIFEST_NAME = ".rvc-batch.jsonl"
DONE, FAILED = "done", "failed"


@dataclass(frozen=True)
class Item:
    source: Path
    name: str  # the input's path relative to the input root (posix); with model_id, its manifest key
    output: Path
    model_id: str
    label: str  # how the summary names it: `name`, or with several voices `model_id/name`


@dataclass(frozen=True)
class BatchOptions:
    model_ids: tuple[str, ...]
    fmt: str = "mp3"
    params: dict[str, str] = field(default_factory=dict)  # as the API names them: {"indexRate": "0.5"}
    concurrency: int = 4
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.model_ids or len(set(self.model_ids)) != len(self.model_ids):
            raise ValueError(f"voices {', '.join(self.model_ids) or '(none)'}: give each voice once")

    def settings(self, model_id: str) -> dict:
        """What a done record of `model_id` must match to count as done for this run."""
        return {"modelId": model_id, "format": self.fmt, "params": dict(sorted(self.params.items()))}


class Backend(Protocol):
    def convert(self, source: Path, dest: Path, model_id: str) -> None:
        """Convert `source` with `model_id` and write the result to `dest` atomically; raise (with
        a one-line reason) when the item fails."""


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # input → reason
    already_done: int = 0
    exists: list[str] = field(default_factory=list)  # outputs there, not replaced (no --overwrite)
    audio_s: float = 0.0
    wall_s: float = 0.0
    interrupted: bool = False

    def text(self) -> str:
        lines = [f"done {len(self.done)}, failed {len(self.failed)}, skipped {self.already_done} done earlier"
                 + (f" and {len(self.exists)} with an existing output" if self.exists else "")
                 + f"; {self.audio_s:.1f} s of audio in {self.wall_s:.1f} s"
                 + (f" ({self.audio_s / self.wall_s:.2f} audio-s/s)" if self.wall_s > 0 else "")]
        lines += [f"  failed {name}: {reason}" for name, reason in sorted(self.failed.items())]
        lines += [f"  not replaced (use --overwrite): {name}" for name in self.exists]
        if self.interrupted:
            lines.append("interrupted: run the same command again to convert the rest")
        return "\n".join(lines)


def find_inputs(source: Path, out_dir: Path) -> tuple[Path, list[Path]]:
    """(root the outputs mirror, input files): a folder's audio files (the output folder left
    out), or the files a list names."""
    if source.is_dir():
        out = out_dir.resolve()
        files = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES
                 and not p.name.startswith(".") and out not in p.resolve().parents]
        return source, sorted(files)
    if not source.is_file():
        raise ValueError(f"{source}: no such folder or file list")
    root = source.parent
    files = []
    for line in source.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = root / line
        if root.resolve() not in path.resolve().parents:
            raise ValueError(f"{source}: {line} is outside {root} (the folder the outputs mirror)")
        files.append(path)
    return root, files


def plan(root: Path, files: list[Path], out_dir: Path, fmt: str, model_ids: tuple[str, ...]) -> list[Item]:
    """Each input with each voice and its output path (see the module's docstring), an input's
    voices one after the other."""
    names = [p.relative_to(root).as_posix() for p in files]
    stems = Counter(Path(n).with_suffix("").as_posix() for n in names)
    several = len(model_ids) > 1
    items = []
    for path, name in zip(files, names):
        stem = Path(name).with_suffix("").as_posix()
        target = f"{name if stems[stem] > 1 else stem}.{fmt}"
        for model_id in model_ids:
            folder = out_dir / model_id if several else out_dir
            items.append(Item(source=path, name=name, output=folder / target, model_id=model_id,
                              label=f"{model_id}/{name}" if several else name))
    return items


class Manifest:
    """The JSONL record of ended items; the last record of an input and voice is the one that counts."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, str], dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a killed run
                    continue
                self.records[self._key(record)] = record

    @staticmethod
    def _key(record: dict) -> tuple[str, str]:
        return record["input"], record["settings"]["modelId"]

    def is_done(self, item: Item, settings: dict) -> bool:
        record = self.records.get((item.name, item.model_id))
        return (record is not None and record["status"] == DONE and record["settings"] == settings
                and item.output.is_file())

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[self._key(record)] = record


@dataclass(frozen=True)
class _Outcome:
    item: Item
    reason: str | None  # None: done
    audio_s: float


def input_seconds(path: Path) -> float:
    try:
        return sf.info(str(path)).duration
    except (sf.LibsndfileError, RuntimeError):
        return 0.0


def _convert_one(backend: Backend, item: Item) -> _Outcome:
    try:
        backend.convert(item.source, item.output, item.model_id)
    except Exception as exc:  # noqa: BLE001 - every failure is this item's reason, the batch goes on
        lines = str(exc).strip().splitlines()
        return _Outcome(item, lines[0] if lines else type(exc).__name__, 0.0)
    return _Outcome(item, None, input_seconds(item.source))


def remove_partials(out_dir: Path) -> None:
    """Files a killed run was still writing."""
    if out_dir.is_dir():
        for path in out_dir.rglob(f"*{PARTIAL_MARK}*"):
            path.unlink(missing_ok=True)


def run_batch(items: list[Item], backend: Backend, options: BatchOptions, manifest: Manifest,
              progress: bool = True) -> Summary:
    """Convert the items not done yet, `options.concurrency` at a time. Ctrl-C stops taking new
    items and returns the summary so far (marked interrupted)."""
    started = time.monotonic()
    summary = Summary()
    pending = []
    for item in items:
        if manifest.is_done(item, options.settings(item.model_id)):
            summary.already_done += 1
        elif item.output.exists() and not options.overwrite:
            summary.exists.append(item.output.as_posix())
        else:
            pending.append(item)

    todo: queue.SimpleQueue[Item] = queue.SimpleQueue()
    for item in pending:
        todo.put(item)
    results: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            results.put(_convert_one(backend, item))

    # Daemon threads: an interrupted run exits without waiting for the items in flight (their
    # outputs are not renamed into place; the next run removes what they left and redoes them).
    for i in range(min(options.concurrency, len(pending))):
        threading.Thread(target=work, name=f"rvc-batch-{i}", daemon=True).start()
    bar = tqdm(total=len(pending), unit="file", disable=not progress, dynamic_ncols=True)
    try:
        for _ in pending:
            outcome = _next(results)
            record = {"input": outcome.item.name, "output": outcome.item.output.as_posix(),
                      "status": DONE if outcome.reason is None else FAILED,
                      "settings": options.settings(outcome.item.model_id),
                      "audioSeconds": round(outcome.audio_s, 3),
                      "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            if outcome.reason is None:
                summary.done.append(outcome.item.label)
                summary.audio_s += outcome.audio_s
            else:
                record["reason"] = outcome.reason
                summary.failed[outcome.item.label] = outcome.reason
            manifest.append(record)
            bar.update(1)
            elapsed = time.monotonic() - started
            bar.set_postfix_str(f"{summary.audio_s / max(elapsed, 1e-9):.2f} audio-s/s, "
                                f"{len(summary.failed)} failed")
    except KeyboardInterrupt:
        stop.set()
        summary.interrupted = True
    finally:
        bar.close()
    summary.wall_s = time.monotonic() - started
    return summary


def _next(results: queue.SimpleQueue) -> _Outcome:
    # A bounded wait, so Ctrl-C is seen at once in the main thread.
    while True:
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            continue


class HttpBackend:
    """Over the public API with `rvc_client`: upload, wait, download the MP3."""

    def __init__(self, client: Client, options: BatchOptions, timeout_s: float):
        if options.fmt != "mp3":
            # The API hands out only the MP3 (inferenceUrl); the lossless copy stays in the
            # cluster's result store, which Ray mode reads.
            raise ValueError(f"--format {options.fmt} needs --ray-address: the HTTP API serves MP3 only")
        self.client, self.options, self.timeout_s = client, options, timeout_s

    def convert(self, source: Path, dest: Path, model_id: str) -> None:
        job = self.client.submit(source, model_id, **self.options.params)
        job = self.client.wait(job.inference_id, self.timeout_s)
        self.client.download(job, dest)


def batch(source: Path, out_dir: Path, backend: Backend, options: BatchOptions, progress: bool = True) -> Summary:
    """The whole command: find, plan, clean up after a killed run, convert, record."""
    root, files = find_inputs(source, out_dir)
    items = plan(root, files, out_dir, options.fmt, options.model_ids)
    remove_partials(out_dir)
    return run_batch(items, backend, options, Manifest(out_dir / MANIFEST_NAME), progress)
