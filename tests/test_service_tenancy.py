"""Per-key voices over real HTTP: a voice is public or owned by one tenant, and a key sees and
uses only the public voices and its own; another tenant's voice is indistinguishable from a
voice that does not exist. Conversion is the stand-in of tests/fake_conversion.py."""
from __future__ import annotations

import io

import httpx
import pytest
import soundfile as sf

from deployments.settings import hash_key
from tests.service_support import (TEST_STAGES, delete_app, register_fake_voice, run_app, serve_url,  # noqa: F401
                                   wait_for, wav_bytes, write_keys)

KEY_A, KEY_B, KEY_C = "tenant-a-key-0123456789", "tenant-b-key-0123456789", "tenant-c-key-0123456789"
PUBLIC = ("pub-1", "pub-2", "pub-3")
OWNED = {KEY_A: ("a-1", "a-2"), KEY_B: ("b-1", "b-2", "b-3"), KEY_C: ()}
APP = "tenancy"


@pytest.fixture(scope="module")
def svc(tmp_path_factory, serve_url):
    from deployments.app import ingress_app
    from deployments.settings import AppSettings
    from tests.fake_conversion import FakeConversion

    data = tmp_path_factory.mktemp(APP)
    for model_id in PUBLIC:
        register_fake_voice(data, model_id)
    for key, model_ids in OWNED.items():
        for model_id in model_ids:
            register_fake_voice(data, model_id, owner=hash_key(key))
    settings = AppSettings(data_dir=data, api_keys_file=write_keys(data / "keys.txt", *OWNED),
                           rate_limit_per_minute=1000, stages=TEST_STAGES)
    run_app(ingress_app(settings, FakeConversion.options(ray_actor_options={"num_cpus": 0}).bind(settings)), APP)
    with httpx.Client(base_url=f"{serve_url}/{APP}", timeout=60) as client:
        yield client, data
    delete_app(APP)


def _create(client: httpx.Client, key: str, model_id: str) -> httpx.Response:
    return client.post("/v1/inferences-vc", params={"modelId": model_id}, headers={"x-api-key": key},
                       files={"audioInfer": ("in.wav", wav_bytes(), "audio/wav")})


def _all_pages(client: httpx.Client, key: str, per_page: int) -> tuple[list[str], list[dict]]:
    """Every model id a key is shown, following nextPageUrl from page 1, and each page's meta."""
    ids, metas = [], []
    url: str | None = f"{str(client.base_url).rstrip('/')}/v1/models-vc?page=1&perPage={per_page}"
    while url is not None:
        body = client.get(url, headers={"x-api-key": key}).json()
        ids += [m["modelId"] for m in body["data"]]
        metas.append(body["meta"])
        url = body["meta"]["nextPageUrl"]
    return ids, metas


def test_each_key_lists_the_public_voices_and_its_own(svc):
    client, _ = svc
    for key, own in OWNED.items():
        visible = sorted(PUBLIC + own)
        first = client.get("/v1/models-vc", headers={"x-api-key": key}).json()
        assert [m["modelId"] for m in first["data"]] == visible
        assert first["meta"]["total"] == len(visible) and first["meta"]["lastPage"] == 1
        # Pages of 2 cover the visible voices exactly once, in order, with totals of this key only.
        ids, metas = _all_pages(client, key, 2)
        assert ids == visible
        last = (len(visible) + 1) // 2
        assert [m["currentPage"] for m in metas] == list(range(1, last + 1))
        assert {(m["total"], m["lastPage"]) for m in metas} == {(len(visible), last)}
        assert metas[-1]["lastPageUrl"].endswith(f"page={last}&perPage=2")
    # Beyond the last page: an empty page of the same totals, never another tenant's voices.
    beyond = client.get("/v1/models-vc", params={"page": 9, "perPage": 2}, headers={"x-api-key": KEY_A}).json()
    assert beyond["data"] == [] and beyond["meta"]["total"] == 5


def test_another_tenants_voice_is_404_exactly_like_a_missing_one(svc):
    client, data = svc
    missing = _create(client, KEY_A, "no-such-voice")
    assert missing.status_code == 404 and missing.json() == {"message": "Model not found"}
    for key, model_id in ((KEY_A, "b-1"), (KEY_B, "a-2"), (KEY_C, "a-1"), (KEY_C, "b-3")):
        refused = _create(client, key, model_id)
        assert refused.status_code == missing.status_code and refused.content == missing.content, (key, model_id)
        assert refused.headers["content-type"] == missing.headers["content-type"]
        assert set(refused.headers) == set(missing.headers)
    calls = data / "calls.log"
    assert not calls.exists() or not calls.read_text()  # nothing ran
    assert not list((data / "uploads").iterdir())  # and no upload was kept


def test_public_and_own_voices_convert(svc):
    client, _ = svc
    for key, model_id in ((KEY_A, "a-1"), (KEY_A, "pub-2"), (KEY_B, "b-2"), (KEY_C, "pub-1")):
        response = _create(client, key, model_id)
        assert response.status_code == 200, (key, model_id, response.text)
        job = response.json()
        assert job["modelId"] == model_id

        def done():
            body = client.get(f"/v1/inferences-vc/{job['inferenceId']}", headers={"x-api-key": key}).json()
            return body if body["status"] != "RUNNING" else None
        assert wait_for(done, 30)["status"] == "SUCCESS"


def test_serve_handle_uses_public_and_owned_voices(svc):
    """The in-cluster handle path (`rvc-serve batch --ray-address`) is the operator's: it may use
    every voice, and refuses a missing one with the API's 404."""
    from ray import serve

    handle = serve.get_app_handle(APP)
    for model_id in ("pub-3", "b-1"):
        mp3 = handle.convert_audio.remote(wav_bytes(), {"modelId": model_id}).result(timeout_s=60)
        assert sf.info(io.BytesIO(mp3)).format == "MP3"
    # its jobs keep the lossless copy (`rvc-serve batch --format flac/wav`), API jobs do not
    flac = handle.convert_audio.remote(wav_bytes(), {"modelId": "pub-3"}, "flac").result(timeout_s=60)
    assert sf.info(io.BytesIO(flac)).format == "FLAC"
    with pytest.raises(ValueError, match='404 {"message": "Model not found"}'):
        handle.convert_audio.remote(wav_bytes(), {"modelId": "no-such-voice"}).result(timeout_s=60)
