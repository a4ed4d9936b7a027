"""Service pieces without Ray: settings, keys, 422 wording, rate window, signed URLs, result
writes, the voice registry, the streaming upload reader, the Serve config check, OpenAPI."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments import params, ratelimit, registry, results, settings, uploads
from deployments.openapi import openapi_document
from deployments.serve_config import check_serve_config, load_serve_config

ROOT = Path(__file__).resolve().parent.parent


# --- settings and keys ------------------------------------------------------------------------

def test_settings_reject_unknown_keys_and_coerce_cli_strings(tmp_path):
    with pytest.raises(ValidationError):
        settings.AppSettings.model_validate({"data_dir": str(tmp_path), "rate_limit": 5})
    with pytest.raises(ValidationError):
        settings.AppSettings.model_validate({"data_dir": str(tmp_path), "stages": {"synthesis": {"num_gpu": 1}}})
    s = settings.AppSettings.model_validate({"data_dir": str(tmp_path), "rate_limit_per_minute": "7",
                                             "stages": {"synthesis": {"num_gpus": 0.5}}})
    assert s.rate_limit_per_minute == 7 and s.data_dir.is_absolute()
    # A stage given in the args keeps the defaults of the keys it does not name.
    assert s.stages.synthesis.num_gpus == 0.5 and s.stages.synthesis.max_ongoing_requests == 2
    with pytest.raises(ValidationError):
        settings.AppSettings.model_validate({"stages": {"pitch": {"min_replicas": 3, "max_replicas": 2}}})
    # a batch larger than the requests a replica takes at once would never fill
    with pytest.raises(ValidationError, match="max_batch_size"):
        settings.AppSettings.model_validate({"stages": {"features": {"max_batch_size": 8, "max_ongoing_requests": 4}}})
    # ... and so would concurrent batches that together need more
    with pytest.raises(ValidationError, match="max_concurrent_batches"):
        settings.AppSettings.model_validate({"stages": {"synthesis": {
            "max_batch_size": 2, "max_concurrent_batches": 2, "max_ongoing_requests": 3}}})
    for bad in ({"precision": "fp8"}, {"pitch_piece_frames": 1000}, {"pitch_piece_frames": 0}):
        with pytest.raises(ValidationError):
            settings.AppSettings.model_validate(bad)


def test_stage_queues_must_hold_their_callers_calls(tmp_path):
    base = {"data_dir": str(tmp_path)}
    defaults = settings.AppSettings.model_validate(base)  # 4 jobs per conversion replica x 8 = 32 queued
    assert defaults.stages.conversion.max_ongoing_requests * defaults.chunks_in_flight == 32
    with pytest.raises(ValidationError, match=r"stages.pitch.max_queued_requests \(31\).*4 x 8 = 32"):
        settings.AppSettings.model_validate({**base, "stages": {"pitch": {"max_queued_requests": 31}}})
    with pytest.raises(ValidationError, match=r"stages.features.max_queued_requests \(32\).*4 x 9 = 36"):
        settings.AppSettings.model_validate({**base, "chunks_in_flight": 9})
    for fits in ({"chunks_in_flight": 4, "stages": {"conversion": {"max_ongoing_requests": 8}}},
                 {"chunks_in_flight": 64, "stages": {n: {"max_queued_requests": -1} for n in settings.MODEL_STAGES}}):
        settings.AppSettings.model_validate({**base, **fits})
    with pytest.raises(ValidationError):
        settings.AppSettings.model_validate({**base, "chunks_in_flight": 0})
    # The job actor's conversion calls (max_concurrent_jobs) likewise fit the conversion's queue.
    with pytest.raises(ValidationError, match=r"stages.conversion.max_queued_requests \(16\).*\(17\)"):
        settings.AppSettings.model_validate({**base, "max_concurrent_jobs": 17})
    # The host pitch stage gets one call per job.
    with pytest.raises(ValidationError, match=r"stages.host_pitch.max_queued_requests \(3\).*\(4\)"):
        settings.AppSettings.model_validate({**base, "stages": {"host_pitch": {"max_queued_requests": 3}}})
    settings.AppSettings.model_validate({**base, "stages": {"host_pitch": {"max_queued_requests": 4}}})


def test_settings_defaults_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RVC_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("RVC_RATE_LIMIT_PER_MINUTE", "9")
    s = settings.AppSettings()
    assert s.data_dir == tmp_path / "d" and s.rate_limit_per_minute == 9
    assert s.f0_methods == ("crepe", "crepe-tiny", "pm", "harvest")  # no rmvpe.pt: rmvpe is not offered
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "rmvpe.pt").write_bytes(b"x")
    assert settings.AppSettings().f0_methods == ("crepe", "crepe-tiny", "rmvpe", "pm", "harvest")


def test_harvest_audio_limit_is_the_smaller_of_the_two():
    assert settings.AppSettings().audio_limit("harvest") == 600
    assert settings.AppSettings().audio_limit("crepe") == settings.AppSettings().audio_limit("pm") == 1800
    assert settings.AppSettings(max_audio_seconds=300).audio_limit("harvest") == 300


def test_host_f0_methods_offered_only_where_their_libraries_import(tmp_path, monkeypatch):
    monkeypatch.setenv("RVC_DATA_DIR", str(tmp_path))
    real_find_spec = settings.importlib.util.find_spec
    monkeypatch.setattr(settings.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyworld" else real_find_spec(name, *a))
    assert settings.AppSettings().f0_methods == ("crepe", "crepe-tiny", "pm")


def test_the_stages_that_run_conversions_yield_the_cpu_to_the_request_path():
    stages = settings.AppSettings().stages
    assert {name: getattr(stages, name).cpu_priority for name in settings.STAGE_DEFAULTS} == {
        "ingress": "normal", "conversion": "idle", "features": "idle", "pitch": "idle", "host_pitch": "idle",
        "synthesis": "idle"}
    normal = settings.AppSettings(stages={"synthesis": {"cpu_priority": "normal"}})
    assert normal.stages.synthesis.cpu_priority == "normal"
    with pytest.raises(ValidationError):
        settings.StageSettings(cpu_priority="low")


def test_a_cpu_priority_the_system_refuses_is_logged_not_fatal(monkeypatch, caplog):
    from deployments import stages

    def refused(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(stages.os, "sched_setscheduler", refused, raising=False)
    monkeypatch.setattr(stages.os, "SCHED_IDLE", 5, raising=False)
    logger = stages.get_logger()  # does not propagate to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        stages.set_cpu_priority("idle")
    finally:
        logger.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records] == ["cpu_priority not applied"]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
@pytest.mark.parametrize("priority, policy", [("idle", "SCHED_IDLE"), ("normal", "SCHED_OTHER")])
def test_cpu_priority_moves_every_thread_and_the_threads_started_after(priority, policy):
    """In a process of its own (SCHED_IDLE cannot be undone without privileges): a thread that
    was running, the calling thread, and a thread started afterwards by the running one."""
    script = f"""
import os, threading
from deployments.stages import set_cpu_priority
go, started = threading.Event(), []
def early():
    go.wait()
    later = threading.Thread(target=lambda: started.append(os.sched_getscheduler(threading.get_native_id())))
    later.start(); later.join()
thread = threading.Thread(target=early); thread.start()
set_cpu_priority({priority!r})
policies = [os.sched_getscheduler(tid) for tid in (os.getpid(), thread.native_id)]
go.set(); thread.join()
print(sorted(set(policies + started)) == [os.{policy}])
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stdout + result.stderr


def test_gpu_share_only_when_the_cluster_has_gpus():
    stage = settings.StageSettings(num_cpus=0.25)
    assert stage.deployment_options("synthesis", False)["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0.0}
    assert stage.deployment_options("synthesis", True)["ray_actor_options"]["num_gpus"] == 0.5
    assert settings.StageSettings(num_gpus=1).deployment_options("pitch", False)["ray_actor_options"]["num_gpus"] == 1


def test_api_keys_from_env_and_file_held_as_hashes(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# operators\nfile-key-1\n\nfile-key-2  # second\n")
    s = settings.AppSettings(data_dir=tmp_path, api_keys_file=keys_file)
    keys = settings.load_api_keys(s, {"RVC_API_KEYS": " env-key , ,other"})
    for key in ("env-key", "other", "file-key-1", "file-key-2"):
        assert keys.tenant(key) == settings.hash_key(key)
    assert keys.tenant("file-key-3") is None and keys.tenant("") is None and keys.tenant(None) is None
    assert "env-key" not in repr(vars(keys))  # only hashes are kept


def test_demo_key_and_url_secret_are_created_once_with_0600(tmp_path):
    s = settings.AppSettings(data_dir=tmp_path)
    keys = settings.load_api_keys(s, {})
    demo = (tmp_path / settings.DEMO_KEY_FILE).read_text().strip()
    assert keys.tenant(demo) is not None
    assert settings.load_api_keys(s, {}).tenant(demo) is not None  # same key on the next start
    secret = settings.url_secret(s, {})
    assert secret == settings.url_secret(s, {}) and len(secret) == 64
    for name in (settings.DEMO_KEY_FILE, settings.URL_SECRET_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert settings.url_secret(s, {"RVC_URL_SECRET": "from-env"}) == b"from-env"


# --- 422 wording ------------------------------------------------------------------------------

def _errors(query: dict, choices=("crepe", "crepe-tiny")) -> list[dict]:
    return params.parse_query(params.CREATE_PARAMS, query, choices)[1]


def test_422_entries_match_pydantic_v1():
    assert _errors({}) == [{"loc": ["query", "modelId"], "msg": "field required", "type": "value_error.missing"}]
    assert _errors({"modelId": "m", "indexRate": "1.5"}) == [
        {"loc": ["query", "indexRate"], "msg": "ensure this value is less than or equal to 1",
         "type": "value_error.number.not_le", "ctx": {"limit_value": 1}}]
    assert _errors({"modelId": "m", "rmsMixRate": "-0.1"}) == [
        {"loc": ["query", "rmsMixRate"], "msg": "ensure this value is greater than or equal to 0",
         "type": "value_error.number.not_ge", "ctx": {"limit_value": 0}}]
    assert _errors({"modelId": "m", "indexRate": "abc"}) == [
        {"loc": ["query", "indexRate"], "msg": "value is not a valid float", "type": "type_error.float"}]
    assert _errors({"modelId": "m", "filterRadius": "2.5"}) == [
        {"loc": ["query", "filterRadius"], "msg": "value is not a valid integer", "type": "type_error.integer"}]
    assert _errors({"modelId": "m", "protect": "0.6"}) == [
        {"loc": ["query", "protect"], "msg": "ensure this value is less than or equal to 0.5",
         "type": "value_error.number.not_le", "ctx": {"limit_value": 0.5}}]
    assert _errors({"modelId": "m", "f0UpKey": "-25"})[0]["ctx"] == {"limit_value": -24}
    assert _errors({"modelId": "m", "f0Method": "yin"}) == [
        {"loc": ["query", "f0Method"], "msg": "value is not a valid enumeration member; permitted: 'crepe', "
         "'crepe-tiny'", "type": "type_error.enum", "ctx": {"enum_values": ["crepe", "crepe-tiny"]}}]
    assert _errors({"modelId": "m", "indexRate": "nan"})[0]["type"] == "value_error.number.not_finite_number"
    # One entry per problem, in declaration order.
    assert [e["loc"][1] for e in _errors({"filterRadius": "9", "indexRate": "x"})] == [
        "modelId", "indexRate", "filterRadius"]


def test_valid_query_fills_defaults():
    values, errors = params.parse_query(params.CREATE_PARAMS, {"modelId": "demo", "filterRadius": "7"}, ("crepe",))
    assert errors == []
    assert values == {"model_id": "demo", "index_rate": 0.76, "rms_mix_rate": 1, "filter_radius": 7,
                      "f0_up_key": 0, "protect": 0.33, "f0_method": "crepe"}


@pytest.mark.parametrize("prefer, seconds", [
    (None, None), ("", None), ("wait=5", 5), ("wait=0", None), ("respond-async, wait=7", 7),
    ('WAIT = 3 ; foo=bar', 3), ('wait="4"', 4), ("wait=3600", params.MAX_POLL_WAIT_S),
    ("wait=soon", None), ("wait=-1", None), ("wait=1.5", None), ("wait=\u00b2", None), ("wait=" + "9" * 40, None),
    ("handling=lenient", None), ("waiting=5", None)])
def test_prefer_wait_is_read_as_rfc_7240_says(prefer, seconds):
    assert params.requested_wait_s(prefer) == seconds


# --- job slots ------------------------------------------------------------------------------

def test_job_slots_go_round_robin_between_tenants():
    """Two slots; tenant a queues four jobs, then b two: each freed slot goes to the tenant
    holding fewer, so b's jobs do not wait behind all of a's."""
    from deployments.jobs import FairSlots

    async def scenario() -> list[str]:
        slots, started = FairSlots(2), []

        async def job(tenant: str, name: str) -> None:
            await slots.acquire(tenant)
            started.append(name)

        tasks = [asyncio.create_task(job("a", f"a{i}")) for i in range(1, 5)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(job("b", f"b{i}")) for i in range(1, 3)]
        await asyncio.sleep(0)
        assert started == ["a1", "a2"]
        for tenant in ("a", "a", "b", "a", "b", "a"):  # each job ends in the order they started
            slots.release(tenant)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert slots.free == 2 and slots.running == {} and all(not q for q in slots.waiting.values())
        return started

    assert asyncio.run(scenario()) == ["a1", "a2", "b1", "a3", "b2", "a4"]


def test_a_cancelled_wait_for_a_job_slot_gives_its_turn_away():
    from deployments.jobs import FairSlots

    async def scenario() -> None:
        slots = FairSlots(1)
        await slots.acquire("a")
        cancelled = asyncio.create_task(slots.acquire("b"))
        waiting = asyncio.create_task(slots.acquire("c"))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        slots.release("a")
        await asyncio.wait_for(waiting, 1)
        assert slots.running == {"c": 1} and slots.free == 0
        # Granted, then cancelled before it ran: the slot goes on to the next waiter.
        late = asyncio.create_task(slots.acquire("d"))
        after = asyncio.create_task(slots.acquire("e"))
        await asyncio.sleep(0)
        slots.release("c")
        late.cancel()
        await asyncio.wait_for(after, 1)
        assert slots.running == {"e": 1} and slots.free == 0

    asyncio.run(scenario())


def test_job_slots_hold_at_most_the_audio_budget_and_let_no_shorter_job_past():
    """Four slots, 100 s of audio: short jobs share them, a job that does not fit waits for the
    audio it needs and later shorter jobs wait behind it; one longer than the budget runs alone."""
    from deployments.jobs import FairSlots

    async def scenario() -> list[str]:
        slots, started = FairSlots(4, audio_capacity_s=100), []

        async def job(tenant: str, name: str, audio_s: float) -> None:
            await slots.acquire(tenant, audio_s)
            started.append(name)

        first = [asyncio.create_task(job("a", f"short{i}", 30)) for i in range(3)]
        await asyncio.sleep(0)
        assert started == ["short0", "short1", "short2"] and slots.audio_running_s == 90
        tasks = [asyncio.create_task(job("b", "long", 60)), asyncio.create_task(job("c", "small", 5))]
        await asyncio.sleep(0)
        assert started == ["short0", "short1", "short2"]  # 10 s free: "small" fits but waits its turn
        slots.release("a", 30)
        await asyncio.sleep(0)
        assert started[3:] == []  # 40 s free: "long" still does not fit
        slots.release("a", 30)
        await asyncio.sleep(0)
        assert started[3:] == ["long", "small"] and slots.audio_running_s == 95
        huge = asyncio.create_task(job("d", "huge", 500))
        await asyncio.sleep(0)
        for tenant, audio_s in (("a", 30), ("b", 60), ("c", 5)):
            assert "huge" not in started
            slots.release(tenant, audio_s)
            await asyncio.sleep(0)
        await asyncio.gather(*first, *tasks, huge)
        assert started[-1] == "huge" and slots.running == {"d": 1} and slots.free == 3
        slots.release("d", 500)
        assert slots.audio_running_s == 0 and slots.free == 4
        return started

    asyncio.run(scenario())


def test_a_cancelled_job_that_others_waited_behind_lets_them_start():
    from deployments.jobs import FairSlots

    async def scenario() -> None:
        slots = FairSlots(4, audio_capacity_s=100)
        await slots.acquire("a", 90)
        blocking = asyncio.create_task(slots.acquire("b", 50))
        behind = asyncio.create_task(slots.acquire("c", 5))
        await asyncio.sleep(0)
        assert not behind.done()
        blocking.cancel()
        await asyncio.wait_for(behind, 1)
        assert slots.running == {"a": 1, "c": 1} and slots.audio_running_s == 95

    asyncio.run(scenario())


# --- rate window ------------------------------------------------------------------------------

def test_sliding_window_is_exact():
    w = ratelimit.SlidingWindow()
    decisions = [w.hit("k", 3, 100.0 + i) for i in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[3].retry_after_s == 57 and decisions[3].reset_at == 160
    assert decisions[3].headers()["Retry-After"] == "57" and "Retry-After" not in decisions[0].headers()
    assert w.hit("other", 3, 103.5).allowed  # budgets are per key
    assert not w.hit("k", 3, 159.9).allowed
    assert w.hit("k", 3, 160.0).allowed  # the first call left the window


# --- results ----------------------------------------------------------------------------------

def test_signed_urls(tmp_path):
    secret = b"s3cret"
    url = results.signed_url(secret, "http://h/app/", "abc/output.mp3", now=1000.0)
    assert url.startswith("http://h/app/results/abc/output.mp3?expires=19000&signature=")
    sig = url.rsplit("=", 1)[1]
    assert results.verify(secret, "abc/output.mp3", "19000", sig, now=18999.0)
    assert not results.verify(secret, "abc/output.mp3", "19000", sig, now=19000.0)  # expired
    assert not results.verify(secret, "abc/output.mp3", "19001", sig, now=1000.0)  # extended
    assert not results.verify(secret, "abc/output.flac", "19000", sig, now=1000.0)  # other file
    assert not results.verify(b"other", "abc/output.mp3", "19000", sig, now=1000.0)
    assert not results.verify(secret, "abc/output.mp3", "-1", sig, now=0.0)
    for bad in ("../x/output.mp3", "abc/../etc", "/abc/x", "abc/.hidden", "a/b/c"):
        with pytest.raises(ValueError):
            results.check_key(bad)


def test_result_writes_are_atomic(tmp_path):
    store = results.LocalResultStore(tmp_path)
    with store.writer("job1/output.flac") as path:
        assert path.suffix == ".flac" and path.parent == tmp_path / "job1"
        path.write_bytes(b"done")
    assert store.local_path("job1/output.flac").read_bytes() == b"done"
    with pytest.raises(RuntimeError):
        with store.writer("job2/output.mp3") as path:
            path.write_bytes(b"half")
            raise RuntimeError("encoder crashed")
    assert store.local_path("job2/output.mp3") is None
    assert list((tmp_path / "job2").iterdir()) == []  # no temp file left behind


# --- registry ---------------------------------------------------------------------------------

def _fake_voice(voices: Path, model_id: str, index: bool = False) -> None:
    d = voices / model_id
    d.mkdir(parents=True)
    (d / "model.pth").write_bytes(b"x")
    if index:
        (d / "added_IVF1_Flat_nprobe_1_x_v2.index").write_bytes(b"x")
    (d / "meta.json").write_text(json.dumps({"modelId": model_id, "name": model_id.upper(), "version": "v2",
                                             "sampleRate": 40000, "f0": True, "createdAt": "t"}))


def test_registry_lists_only_complete_voices_with_safe_ids(tmp_path):
    voices = tmp_path / "voices"
    _fake_voice(voices, "b-voice", index=True)
    _fake_voice(voices, "a_voice")
    (voices / "half").mkdir()
    (voices / "half" / "model.pth").write_bytes(b"x")  # no meta.json yet: not registered
    listed = registry.list_voices(voices)
    assert [v.model_id for v in listed] == ["a_voice", "b-voice"]
    assert listed[1].as_json() == {"modelId": "b-voice", "name": "B-VOICE", "version": "v2", "sampleRate": 40000,
                                   "f0": True, "hasIndex": True, "createdAt": "t"}
    for bad in ("../voices/a_voice", "a/b", ".hidden", "", "x" * 65, "a voice"):
        assert registry.get_voice(voices, bad) is None
        with pytest.raises(registry.RegistryError):
            registry.voice_dir(voices, bad)


def test_models_page_shape(tmp_path):
    voices = tmp_path / "voices"
    for i in range(5):
        _fake_voice(voices, f"v{i}")
    listed = registry.list_voices(voices)
    page = registry.models_page(listed, 2, 2, "http://h/app")
    assert [m["modelId"] for m in page["data"]] == ["v2", "v3"]
    assert page["meta"] == {
        "total": 5, "perPage": 2, "currentPage": 2, "lastPage": 3, "firstPage": 1,
        "firstPageUrl": "http://h/app/v1/models-vc?page=1&perPage=2",
        "lastPageUrl": "http://h/app/v1/models-vc?page=3&perPage=2",
        "nextPageUrl": "http://h/app/v1/models-vc?page=3&perPage=2",
        "previousPageUrl": "http://h/app/v1/models-vc?page=1&perPage=2"}
    last = registry.models_page(listed, 3, 2, "http://h")
    assert last["meta"]["nextPageUrl"] is None and len(last["data"]) == 1
    empty = registry.models_page([], 1, 20, "http://h")
    assert empty["meta"]["lastPage"] == 1 and empty["data"] == [] and empty["meta"]["previousPageUrl"] is None


def test_add_model_validates_by_loading(tmp_path):
    pytest.importorskip("pipeline.synthesizer")
    from pipeline.assets import AssetError
    from pipeline.synthesizer import random_voice_checkpoint, save_voice

    source = tmp_path / "src.pth"
    save_voice(random_voice_checkpoint(3, version="v1", sample_rate=32000, f0=False), source)
    info = registry.add_model(tmp_path, "my-voice", source, name="Mine")
    assert (info.version, info.sample_rate, info.f0, info.index_path, info.name) == ("v1", 32000, False, None, "Mine")
    assert registry.get_voice(tmp_path / "voices", "my-voice") == info
    with pytest.raises(registry.RegistryError):
        registry.add_model(tmp_path, "my-voice", source)
    with pytest.raises(registry.RegistryError):
        registry.add_model(tmp_path, "../escape", source)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(source.read_bytes()[:1000])
    with pytest.raises(AssetError):
        registry.add_model(tmp_path, "broken", broken)
    assert [v.model_id for v in registry.list_voices(tmp_path / "voices")] == ["my-voice"]
    assert not any(p.name.startswith(".adding") for p in (tmp_path / "voices").iterdir())


def test_voice_owner_decides_visibility(tmp_path):
    pytest.importorskip("pipeline.synthesizer")
    from pipeline.synthesizer import random_voice_checkpoint, save_voice

    source = tmp_path / "src.pth"
    save_voice(random_voice_checkpoint(3, version="v2", sample_rate=40000, f0=True), source)
    alice, bob = settings.hash_key("alice-key"), settings.hash_key("bob-key")
    owned = registry.add_model(tmp_path, "alices", source, owner=alice)
    public = registry.add_model(tmp_path, "everyones", source)
    assert json.loads((tmp_path / "voices" / "alices" / "meta.json").read_text())["owner"] == alice
    assert "owner" not in json.loads((tmp_path / "voices" / "everyones" / "meta.json").read_text())
    assert (owned.owner, public.owner) == (alice, None)
    assert owned.visible_to(alice) and not owned.visible_to(bob)
    assert public.visible_to(alice) and public.visible_to(bob)
    assert "owner" not in owned.as_json()
    # Only a tenant id can own a voice (a key given by mistake, or the Serve-handle tenant, cannot).
    for bad in ("alice-key", "serve-handle", alice.upper(), alice[:-1]):
        with pytest.raises(registry.RegistryError):
            registry.add_model(tmp_path, "nope", source, owner=bad)
    assert not (tmp_path / "voices" / "nope").exists()


# --- streaming upload reader ------------------------------------------------------------------

def _multipart(parts: list[tuple[str, bytes]], boundary: str = "XyZ") -> tuple[str, bytes]:
    body = b""
    for name, data in parts:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"f.bin\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


async def _chunks(data: bytes, size: int = 7777):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _receive(content_type, body: bytes, dest: Path, size: int = 7777) -> uploads.Upload:
    return asyncio.run(uploads.receive_upload(content_type, _chunks(body, size), dest))


def test_upload_reader_writes_only_the_file_part(tmp_path):
    payload = bytes(range(256)) * 1000 + b"\r\n--XyZ-not-a-boundary"
    ctype, body = _multipart([("other", b"ignored"), ("audioInfer", payload), ("audioInfer", b"second")])
    up = _receive(ctype, body, tmp_path)
    assert up.path.read_bytes() == payload and up.size == len(payload)
    assert up.sha256 == hashlib.sha256(payload).hexdigest()  # of the part's bytes, cut at any chunk size


def test_upload_reader_without_a_file_part(tmp_path):
    ctype, body = _multipart([("other", b"x")])
    assert _receive(ctype, body, tmp_path).path is None
    assert _receive("application/json", b'{"audioInfer": 1}', tmp_path).path is None
    assert _receive(None, b"", tmp_path).path is None
    ctype, body = _multipart([("audioInfer", b"abc" * 100)])
    assert _receive(ctype, body[:-40], tmp_path).path is None  # cut inside the file part
    assert list(tmp_path.iterdir()) == []


def test_upload_reader_cuts_off_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_FILE_BYTES", 1000)
    monkeypatch.setattr(uploads, "MAX_BODY_BYTES", 1500)
    ctype, body = _multipart([("audioInfer", b"a" * 1000)])
    accepted = _receive(ctype, body, tmp_path, size=100)
    assert accepted.size == 1000
    accepted.path.unlink()
    ctype, body = _multipart([("audioInfer", b"a" * 1001)])
    with pytest.raises(uploads.PayloadTooLarge):
        _receive(ctype, body, tmp_path, size=100)
    ctype, body = _multipart([("other", b"b" * 2000)])  # the body limit holds for any part
    with pytest.raises(uploads.PayloadTooLarge):
        _receive(ctype, body, tmp_path, size=100)
    with pytest.raises(uploads.PayloadTooLarge):  # and for bodies that are not even multipart
        _receive("text/plain", b"c" * 2000, tmp_path, size=100)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".upload")] == []


def test_declared_length_over_the_limit():
    assert [uploads.declared_too_large(v) for v in (None, "", "100", str(uploads.MAX_BODY_BYTES))] == [False] * 4
    assert uploads.declared_too_large(str(uploads.MAX_BODY_BYTES + 1))
    assert uploads.declared_too_large("9" * 5000)  # int() of it would raise
    assert not uploads.declared_too_large("²") and not uploads.declared_too_large("-1")  # "²".isdigit() is True


def test_disk_short_counts_the_upload_and_the_reserve(tmp_path):
    free = __import__("shutil").disk_usage(tmp_path).free
    assert not uploads.disk_short(tmp_path, "1000", 0)
    assert uploads.disk_short(tmp_path, "1000", free)  # the reserve plus the upload do not fit
    room = free - 2 * uploads.MAX_BODY_BYTES  # fits a declared 1 kB upload, not an undeclared one
    assert not uploads.disk_short(tmp_path, "1000", room)
    for unknown in (None, "", "chunked", "²", "9" * 40):  # assume the largest upload allowed
        assert uploads.disk_short(tmp_path, unknown, free - uploads.MAX_BODY_BYTES // 2)


def test_upload_reader_memory_is_bounded(tmp_path):
    """50 MiB + 1 streamed through the reader: 413, and never more than a few chunks held."""
    import tracemalloc

    chunk = b"\0" * (1024 * 1024)

    async def body():
        yield b'--XyZ\r\nContent-Disposition: form-data; name="audioInfer"; filename="a"\r\n\r\n'
        for _ in range(50):
            yield chunk
        yield b"\0"  # the byte over the limit
        yield b"\r\n--XyZ--\r\n"

    tracemalloc.start()
    try:
        with pytest.raises(uploads.PayloadTooLarge):
            asyncio.run(uploads.receive_upload("multipart/form-data; boundary=XyZ", body(), tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB while streaming 50 MiB"
    assert list(tmp_path.iterdir()) == []


# --- Serve config and OpenAPI -----------------------------------------------------------------

def test_serve_config_is_strictly_valid():
    config = load_serve_config(ROOT / "serve_config.yaml")
    (app_settings,) = check_serve_config(config)
    assert [a["name"] for a in config["applications"]] == ["rvc"]
    stages = [getattr(app_settings.stages, name) for name in settings.STAGE_DEFAULTS]
    assert len(stages) == len(settings.StagesSettings.model_fields)
    for stage in stages:
        assert stage.min_replicas >= 1 and stage.max_queued_requests > 0 and stage.num_cpus <= 0.25
    # Every stage at its max_replicas fits on 2 CPUs.
    assert sum(stage.num_cpus * stage.max_replicas for stage in stages) <= 2


@pytest.mark.parametrize("mutate", [
    lambda c: c["http_options"].update(prot=8000),
    lambda c: c["applications"][0].update(deploymnets=[]),
    lambda c: c["applications"][0]["args"].update(job_timout_s=5),
    lambda c: c["applications"][0]["args"]["stages"]["synthesis"].update(num_gpu=1),
])
def test_serve_config_typos_are_refused(mutate):
    config = load_serve_config(ROOT / "serve_config.yaml")
    mutate(config)
    with pytest.raises(ValueError):
        check_serve_config(config)


def test_openapi_matches_the_validation_tables():
    doc = openapi_document(("crepe", "rmvpe"), 1800, 600)
    post = doc["paths"]["/v1/inferences-vc"]["post"]
    by_name = {p["name"]: p for p in post["parameters"]}
    assert list(by_name) == [p.name for p in params.CREATE_PARAMS] + [params.IDEMPOTENCY_HEADER]
    assert by_name[params.IDEMPOTENCY_HEADER]["in"] == "header"
    assert by_name[params.IDEMPOTENCY_HEADER]["schema"]["pattern"] == params.IDEMPOTENCY_KEY_PATTERN
    assert set(doc["paths"]["/v1/inferences-vc/{inferenceId}"]) == {"get", "delete"}
    assert by_name["modelId"]["required"] and not by_name["indexRate"]["required"]
    assert by_name["indexRate"]["schema"] == {"type": "number", "minimum": 0, "maximum": 1, "default": 0.76}
    assert by_name["f0Method"]["schema"]["enum"] == ["crepe", "rmvpe"]
    assert set(post["responses"]) == {"200", "402", "403", "404", "413", "422", "429", "503"}
    audio = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["audioInfer"]
    assert "1800 s of audio" in audio["description"]
    get = doc["paths"]["/v1/inferences-vc/{inferenceId}"]["get"]
    assert [p["name"] for p in get["parameters"]] == ["inferenceId", params.PREFER_HEADER]
    assert "Preference-Applied" in get["responses"]["200"]["headers"]
    json.dumps(doc)


def test_the_ingress_and_the_job_actor_load_no_model_or_dsp_libraries():
    """They probe uploads (pipeline.audio) but never filter, encode or run a network: scipy.signal
    alone is ~75 MB resident in every ingress replica and the job actor."""
    import subprocess
    import sys

    code = ("import sys, deployments.ingress, deployments.jobs\n"
            "print(sorted(m for m in ('torch', 'scipy.signal', 'pedalboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
