"""The voice registry: one directory per voice model under `<data_dir>/voices/`.

    voices/<modelId>/model.pth     the RVC voice checkpoint
    voices/<modelId>/*.index       optional retrieval index (an "added_" faiss index)
    voices/<modelId>/meta.json     name, version, sampleRate, f0, createdAt, owner (written on add)

A voice is listed only once its meta.json exists, and `add_model` moves a fully validated
directory into place with one rename, so the service never sees half a voice.

A voice is public (no `owner`: every key may use it, e.g. the demo voice) or owned by one
tenant (`owner` is the tenant id, the SHA-256 hex of its API key, as `settings.hash_key`):
only that key sees it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from .store import format_timestamp, now_us

MODEL_FILE = "model.pth"
META_FILE = "meta.json"
INDEX_FILE = "added.index"
_MODEL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_TENANT_RE = re.compile(r"[0-9a-f]{64}")
DEFAULT_PER_PAGE, MAX_PER_PAGE = 20, 100


class RegistryError(ValueError):
    """A model id or voice files the registry refuses."""


@dataclass(frozen=True)
class VoiceInfo:
    model_id: str
    name: str
    version: str  # "v1" | "v2"
    sample_rate: int
    f0: bool
    created_at: str
    model_path: Path
    index_path: Path | None
    owner: str | None = None  # the owning tenant; None: public

    def visible_to(self, tenant: str) -> bool:
        return self.owner is None or self.owner == tenant

    def as_json(self) -> dict:
        return {"modelId": self.model_id, "name": self.name, "version": self.version,
                "sampleRate": self.sample_rate, "f0": self.f0, "hasIndex": self.index_path is not None,
                "createdAt": self.created_at}


def is_model_id(model_id: str) -> bool:
    return _MODEL_ID_RE.fullmatch(model_id) is not None


def voice_dir(voices_dir: Path, model_id: str) -> Path:
    if not is_model_id(model_id):
        raise RegistryError(f"invalid model id {model_id!r}: use 1-64 of A-Z a-z 0-9 _ -, "
                            "starting with a letter or digit")
    return voices_dir / model_id


def find_index(directory: Path) -> Path | None:
    """The voice's retrieval index: `added.index`, else the first `*.index` that is not a
    vector-less "trained_" index."""
    if (directory / INDEX_FILE).is_file():
        return directory / INDEX_FILE
    candidates = [p for p in sorted(directory.glob("*.index")) if not p.name.startswith("trained")]
    return candidates[0] if candidates else None


def get_voice(voices_dir: Path, model_id: str) -> VoiceInfo | None:
    """The registered voice, or None (unknown or unsafe id, or not fully registered)."""
    if not is_model_id(model_id):
        return None
    directory = voices_dir / model_id
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        return None
    return VoiceInfo(model_id=model_id, name=meta.get("name", model_id), version=meta["version"],
                     sample_rate=int(meta["sampleRate"]), f0=bool(meta["f0"]),
                     created_at=meta["createdAt"], model_path=model_path, index_path=find_index(directory),
                     owner=meta.get("owner"))


def list_voices(voices_dir: Path) -> list[VoiceInfo]:
    """Every registered voice, by model id."""
    if not voices_dir.is_dir():
        return []
    found = (get_voice(voices_dir, d.name) for d in sorted(voices_dir.iterdir()) if d.is_dir())
    return [v for v in found if v is not None]


def models_page(voices: list[VoiceInfo], page: int, per_page: int, base_url: str) -> dict:
    """One page of the voice list in the contract's shape (`meta` + `data`)."""
    total = len(voices)
    last = max(1, math.ceil(total / per_page))

    def url(n: int) -> str:
        return f"{base_url.rstrip('/')}/v1/models-vc?{urlencode({'page': n, 'perPage': per_page})}"

    start = (page - 1) * per_page
    return {
        "meta": {
            "total": total, "perPage": per_page, "currentPage": page, "lastPage": last, "firstPage": 1,
            "firstPageUrl": url(1), "lastPageUrl": url(last),
            "nextPageUrl": url(page + 1) if page < last else None,
            "previousPageUrl": url(page - 1) if page > 1 else None,
        },
        "data": [v.as_json() for v in voices[start:start + per_page]],
    }


def write_meta(directory: Path, model_id: str, name: str | None = None, owner: str | None = None) -> dict:
    """Load the voice (and its index) to validate them, then write meta.json from what loaded,
    with `owner` (a tenant id) when the voice is not public.

    Raises pipeline.assets.AssetError (or RegistryError) when a file does not load or the index
    does not fit the voice."""
    from pipeline.index import load_index
    from pipeline.synthesizer import load_voice

    voice = load_voice(directory / MODEL_FILE, "cpu")
    index_path = find_index(directory)
    if index_path is not None:
        index = load_index(index_path)
        if index.dim != voice.feature_dim:
            raise RegistryError(f"{index_path.name} holds {index.dim}-d vectors, the {voice.version} voice "
                                f"uses {voice.feature_dim}-d features")
    meta = {"modelId": model_id, "name": name or model_id, "version": voice.version,
            "sampleRate": int(voice.sample_rate), "f0": bool(voice.f0), "createdAt": format_timestamp(now_us())}
    if owner is not None:
        meta["owner"] = owner
    tmp = directory / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory / META_FILE)
    return meta


def add_model(data_dir: str | Path, model_id: str, pth: str | Path, index: str | Path | None = None,
              name: str | None = None, owner: str | None = None) -> VoiceInfo:
    """Register a voice, public or owned by the tenant `owner`: copy its files aside, validate
    them by loading, then move the directory into `<data_dir>/voices/<model_id>` in one rename.
    Refuses an id that already exists."""
    from pipeline.assets import AssetError  # torch: kept out of the ingress's imports

    if owner is not None and not _TENANT_RE.fullmatch(owner):
        raise RegistryError("owner must be a tenant id (the SHA-256 hex of its API key)")
    voices_dir = Path(data_dir) / "voices"
    final = voice_dir(voices_dir, model_id)
    if final.exists():
        raise RegistryError(f"model {model_id!r} already exists")
    voices_dir.mkdir(parents=True, exist_ok=True)
    staging = voices_dir / f".adding-{model_id}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shutil.copyfile(pth, staging / MODEL_FILE)
        if index is not None:
            shutil.copyfile(index, staging / INDEX_FILE)
        try:
            write_meta(staging, model_id, name, owner)
        except AssetError as e:  # name the user's file, not our staging copy
            message = str(e).replace(str(staging / MODEL_FILE), str(pth))
            if index is not None:
                message = message.replace(str(staging / INDEX_FILE), str(index))
            raise AssetError(message) from None
        try:
            os.rename(staging, final)
        except OSError:
            raise RegistryError(f"model {model_id!r} already exists") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return get_voice(voices_dir, model_id)
