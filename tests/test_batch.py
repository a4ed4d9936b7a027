"""`rvc-serve batch`: planning and resuming without a service, then the real service (real
stages, the random-weight fixture voice) over HTTP and through its Serve handle.

The input folder has nested sub-folders, one corrupt file, one file name in two sub-folders
(`a/x.wav`, `b/x.wav`) and two inputs of one folder with one stem (`y.wav`, `y.flac`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from deployments.batch import MANIFEST_NAME, BatchOptions, Manifest, find_inputs, plan, run_batch
from deployments.cli import main as cli_main
from rvc_client.files import PARTIAL_MARK
from tests.service_support import TEST_STAGES, delete_app, run_app, serve_url, wait_for, write_keys  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
KEY = "batch-key-0123456789"
APP = "batch"
VOICE = "v2-48k-nof0"  # no pitch track: the fastest real conversion of the fixture set
GOOD = ["a/x.wav", "b/deep/y.flac", "b/deep/y.wav", "b/x.wav"]
CORRUPT = "a/broken.mp3"
SECONDS = {"a/x.wav": 0.8, "b/deep/y.flac": 0.7, "b/deep/y.wav": 0.5, "b/x.wav": 0.6}


def outputs(fmt: str) -> dict[str, str]:
    """Input → output path the batch must use (y.* share a stem: full names kept)."""
    return {name: (f"{name}.{fmt}" if name.startswith("b/deep/y") else f"{name.rsplit('.', 1)[0]}.{fmt}")
            for name in GOOD}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    from pipeline.demo import synthetic_speech

    root = tmp_path_factory.mktemp("batch-in")
    for seed, name in enumerate(GOOD):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, synthetic_speech(SECONDS[name], seed=seed), 16000, subtype="PCM_16")
    (root / CORRUPT).write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" + b"\x13" * 3000)
    (root / "a" / "notes.txt").write_text("not audio: not an input")
    return root


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


# --- without a service ---------------------------------------------------------------------------

def test_plan_mirrors_the_folder_and_keeps_colliding_names_apart(inputs, tmp_path):
    out = inputs / "out"  # an output folder inside the input folder is not read as input
    (out / "old").mkdir(parents=True)
    sf.write(out / "old" / "converted.wav", [0.0] * 100, 16000)
    try:
        root, files = find_inputs(inputs, out)
    finally:
        shutil.rmtree(out)
    items = plan(root, files, out, "mp3", ("m",))
    assert {i.name: i.output.relative_to(out).as_posix() for i in items} == {**outputs("mp3"), CORRUPT: "a/broken.mp3"}
    # several voices: a folder each, an input's voices one after the other
    items = plan(root, files, out, "mp3", ("m", "n"))
    assert [(i.name, i.model_id) for i in items[:4]] == [(items[0].name, "m"), (items[0].name, "n"),
                                                          (items[2].name, "m"), (items[2].name, "n")]
    assert {(i.label, i.output.relative_to(out).as_posix()) for i in items} == {
        (f"{voice}/{name}", f"{voice}/{target}") for voice in ("m", "n")
        for name, target in {**outputs("mp3"), CORRUPT: "a/broken.mp3"}.items()}
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two of them\n{inputs.name}/b/x.wav\n\n{inputs.name}/a/x.wav\n")
    root, files = find_inputs(listing, tmp_path / "o")
    assert [p.relative_to(root).as_posix() for p in files] == [f"{inputs.name}/b/x.wav", f"{inputs.name}/a/x.wav"]
    listing.write_text("../elsewhere.wav\n")
    with pytest.raises(ValueError, match="outside"):
        find_inputs(listing, tmp_path / "o")


class _Recorder:
    """A backend double: writes the input's bytes as the output, fails on request."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[str] = []
        self.voices: list[str] = []
        self.fail = fail

    def convert(self, source: Path, dest: Path, model_id: str) -> None:
        self.calls.append(source.name)
        self.voices.append(model_id)
        if source.name in self.fail:
            raise RuntimeError(f"cannot convert {source.name}\nmore detail")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())


def test_rerun_skips_done_retries_failed_and_never_overwrites(inputs, tmp_path):
    out = tmp_path / "out"
    root, files = find_inputs(inputs, out)
    items = plan(root, files, out, "mp3", ("m",))
    options = BatchOptions(model_ids=("m",), params={"indexRate": "0.5"}, concurrency=2)
    first = _Recorder(fail={"y.flac"})
    summary = run_batch(items, first, options, Manifest(out / MANIFEST_NAME), progress=False)
    assert sorted(summary.done) == sorted(set(GOOD + [CORRUPT]) - {"b/deep/y.flac"})
    assert summary.failed == {"b/deep/y.flac": "cannot convert y.flac"}
    assert summary.audio_s == pytest.approx(sum(SECONDS.values()) - SECONDS["b/deep/y.flac"], abs=0.01)

    second = _Recorder()
    summary = run_batch(items, second, options, Manifest(out / MANIFEST_NAME), progress=False)
    assert second.calls == ["y.flac"] and summary.already_done == 4 and summary.done == ["b/deep/y.flac"]

    # Other settings: nothing counts as done, and the outputs there are not replaced ...
    other = BatchOptions(model_ids=("m",), params={"indexRate": "0.9"})
    third = _Recorder()
    summary = run_batch(items, third, other, Manifest(out / MANIFEST_NAME), progress=False)
    assert third.calls == [] and len(summary.exists) == 5 and "use --overwrite" in summary.text()
    # ... unless asked to.
    summary = run_batch(items, third, BatchOptions(model_ids=("m",), overwrite=True), Manifest(out / MANIFEST_NAME),
                        progress=False)
    assert len(third.calls) == 5 and len(summary.done) == 5
    with (out / MANIFEST_NAME).open("a") as f:
        f.write('{"input": "cut sho')  # a line a killed run left half written
    assert len(Manifest(out / MANIFEST_NAME).records) == 5


def test_several_voices_each_with_its_own_record(inputs, tmp_path):
    out = tmp_path / "out"
    root, files = find_inputs(inputs, out)
    voices = ("m", "n")
    items = plan(root, files, out, "mp3", voices)
    first = _Recorder(fail={"y.flac"})
    options = BatchOptions(model_ids=voices, concurrency=1)
    summary = run_batch(items, first, options, Manifest(out / MANIFEST_NAME), progress=False)
    assert first.voices == ["m", "n"] * 5  # one file after the other, in each voice
    assert summary.failed == {"m/b/deep/y.flac": "cannot convert y.flac", "n/b/deep/y.flac": "cannot convert y.flac"}
    assert len(summary.done) == 8 and (out / "n" / outputs("mp3")["a/x.wav"]).is_file()
    # a rerun with one voice more converts the failed file in both and every file in the new one
    again = _Recorder()
    summary = run_batch(plan(root, files, out, "mp3", (*voices, "o")), again, BatchOptions(model_ids=(*voices, "o")),
                        Manifest(out / MANIFEST_NAME), progress=False)
    assert summary.already_done == 8 and len(summary.done) == 7
    assert sorted(zip(again.calls, again.voices)) == sorted(
        [("y.flac", "m"), ("y.flac", "n")] + [(Path(f).name, "o") for f in files])
    with pytest.raises(ValueError, match="give each voice once"):
        BatchOptions(model_ids=("m", "m"))


# --- the real service ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory, serve_url, fixture_set):
    from deployments.app import build_app
    from deployments.registry import add_model

    data = tmp_path_factory.mktemp("batch-svc")
    voice = fixture_set["voices"][VOICE]
    add_model(data, "voice", voice["pth"], voice["index"])
    add_model(data, "voice-b", voice["pth"], voice["index"])  # the same weights under another id
    app = build_app({"data_dir": str(data), "hubert_path": fixture_set["hubert"],
                     "api_keys_file": str(write_keys(data / "keys", KEY)), "rate_limit_per_minute": 10000,
                     "job_timeout_s": 300, "stages": TEST_STAGES})
    run_app(app, APP)
    yield {"url": f"{serve_url}/{APP}", "data": data}
    delete_app(APP)


def assert_converted(out: Path, fmt: str, names: list[str]) -> None:
    for name in names:
        audio, rate = sf.read(out / outputs(fmt)[name])
        assert rate == 48000 and abs(audio.shape[0] / rate - SECONDS[name]) < 0.08, name
        assert abs(audio).max() > 0, name


def assert_corrupt_failed(records: list[dict]) -> None:
    failed = [r for r in records if r["input"] == CORRUPT]
    assert failed and failed[-1]["status"] == "failed"
    assert failed[-1]["reason"].startswith("402 ") and "Invalid file type" in failed[-1]["reason"]


def test_ray_mode_converts_through_the_serve_handle(service, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["batch", str(inputs), "--model", "voice", "-o", str(out), "--ray-address", "auto", "--app", APP,
            "--format", "wav", "--concurrency", "2", "-q"]
    assert cli_main(args) == 1
    summary = capsys.readouterr().out
    assert "done 4, failed 1" in summary and f"failed {CORRUPT}: 402" in summary
    assert_converted(out, "wav", GOOD)
    assert sf.info(out / outputs("wav")["a/x.wav"]).subtype == "PCM_16"
    assert_corrupt_failed(read_manifest(out))
    # An unknown model and a bad parameter are refused with the API's answers.
    assert cli_main([*args[:3], "ghost", "-o", str(tmp_path / "ghost"), *args[6:]]) == 1
    assert 'failed a/x.wav: 404 {"message": "Model not found"}' in capsys.readouterr().out
    assert cli_main([*args[:4], "-o", str(tmp_path / "bad"), *args[6:], "--index-rate", "2"]) == 1
    assert "failed a/x.wav: 422" in capsys.readouterr().out and "less than or equal to 1" in \
        (tmp_path / "bad" / MANIFEST_NAME).read_text()


def test_several_voices_share_each_inputs_features(service, inputs, tmp_path, capsys):
    """Each file in two voices, its two jobs sent together: the second takes the first's
    features from the conversion replica's input cache, and both outputs are the same (the
    two ids hold the same weights)."""
    import httpx
    import numpy as np

    from bench.load import parse_service_metrics

    def input_cache_hits() -> float:
        return parse_service_metrics(httpx.get(f"{service['url']}/metrics", timeout=30).text)["input_cache:hit"]

    out = tmp_path / "out"
    before = input_cache_hits()
    assert cli_main(["batch", str(inputs), "--model", "voice,voice-b", "-o", str(out), "--ray-address", "auto",
                     "--app", APP, "--format", "wav", "--concurrency", "2", "-q"]) == 1
    summary = capsys.readouterr().out
    assert "done 8, failed 2" in summary and f"failed voice-b/{CORRUPT}: 402" in summary
    for name in GOOD:
        first, _ = sf.read(out / "voice" / outputs("wav")[name], dtype="int16")
        second, _ = sf.read(out / "voice-b" / outputs("wav")[name], dtype="int16")
        assert first.shape == second.shape and np.abs(first.astype(np.int32) - second).max() <= 1, name
    assert input_cache_hits() - before >= len(GOOD)


def test_http_mode_interrupted_then_resumed(service, inputs, tmp_path, capsys):
    """The CLI in its own process, stopped with Ctrl-C after its first file (the earliest point:
    Ctrl-C must land before the last of the four, ~1 s each, is done); the same command again
    converts only the rest; a third time converts nothing."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "deployments.cli", "batch", str(inputs), "--model", "voice", "-o", str(out),
               "--concurrency", "1", "--index-rate", "0.5"]
    env = {**os.environ, "RVC_URL": service["url"], "RVC_API_KEY": KEY}  # the env fallbacks
    # Python keeps SIGINT ignored when it starts ignored (as under a shell's background job, e.g. a
    # CI runner's): the child installs Ctrl-C's handler itself, then runs the CLI as its main.
    ctrl_c_able = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "runpy.run_module('deployments.cli', run_name='__main__')")
    first = subprocess.Popen([sys.executable, "-c", ctrl_c_able, *command[3:]], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def one_done() -> bool:
            manifest = out / MANIFEST_NAME
            return manifest.exists() and any('"done"' in line for line in manifest.read_text().splitlines())
        wait_for(one_done, 240, interval_s=0.05)
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130, stderr
    assert "interrupted: run the same command again" in stdout
    before = {r["input"] for r in read_manifest(out) if r["status"] == "done"}
    assert 1 <= len(before) < len(GOOD)
    stamps = {name: (out / outputs("mp3")[name]).stat().st_mtime_ns for name in before}

    http = ["--url", service["url"], "--api-key", KEY, "-q"]
    assert cli_main([*command[3:-4], "--concurrency", "2", "--index-rate", "0.5", *http]) == 1  # the corrupt file
    summary = capsys.readouterr().out
    assert f"done {len(GOOD) - len(before)}, failed 1, skipped {len(before)} done earlier" in summary
    assert f"failed {CORRUPT}: 402 Invalid file type" in summary
    assert {name: (out / outputs("mp3")[name]).stat().st_mtime_ns for name in before} == stamps
    records = read_manifest(out)
    assert sorted(r["input"] for r in records if r["status"] == "done") == sorted(GOOD)  # each exactly once
    assert all(r["settings"]["params"] == {"indexRate": "0.5"} for r in records)
    assert_corrupt_failed(records)
    assert_converted(out, "mp3", GOOD)
    assert not list(out.rglob(f"*{PARTIAL_MARK}*"))

    assert cli_main([*command[3:], *http]) == 1  # only the corrupt file is tried again
    assert f"done 0, failed 1, skipped {len(GOOD)} done earlier" in capsys.readouterr().out
    assert cli_main([*command[3:], "--format", "flac", *http]) == 2
    assert "needs --ray-address" in capsys.readouterr().err
