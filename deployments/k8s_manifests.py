"""The `k8s/` tree: kustomize overlays of a KubeRay RayService, and rendering them.

One source of truth for the Serve config: an overlay's `spec.serveConfigV2` is generated from
serve_config.yaml, then k8s/base/serve-values.yaml, then the overlay's serve-values.yaml (merged
key by key; applications by name), checked strictly, and written to the overlay's
serve-config.generated.yaml (a kustomize patch), so that `kubectl kustomize` alone renders the
whole deployment. Rendering refuses a generated patch that no longer matches its sources.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .serve_config import check_serve_config, load_serve_config

SERVE_VALUES = "serve-values.yaml"
GENERATED = "serve-config.generated.yaml"
RAYSERVICE_API = ("ray.io/v1", "RayService")
RAYSERVICE_NAME = "rvc"


def merge(base: Any, override: Any) -> Any:
    """`override` over `base`: dicts merge key by key, lists of named dicts by name; anything
    else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{key: merge(base.get(key), value) for key, value in override.items()}}
    if _named_list(base) and _named_list(override):
        merged = {item["name"]: item for item in base}
        for item in override:
            merged[item["name"]] = merge(merged.get(item["name"]), item)
        return list(merged.values())
    return override


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the embedded Serve config reads as YAML."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


@dataclass(frozen=True)
class Overlay:
    """`k8s/overlays/<name>` of the repository whose k8s directory is `k8s_dir`."""

    k8s_dir: Path
    name: str

    @property
    def directory(self) -> Path:
        return self.k8s_dir / "overlays" / self.name

    @property
    def generated_path(self) -> Path:
        return self.directory / GENERATED

    @property
    def sources(self) -> list[Path]:
        """The files the Serve config is made of, in merge order."""
        return [self.k8s_dir.parent / "serve_config.yaml", self.k8s_dir / "base" / SERVE_VALUES,
                self.directory / SERVE_VALUES]

    def serve_config(self) -> dict:
        """The Serve config this overlay deploys, checked strictly (ValueError otherwise)."""
        if not self.directory.is_dir():
            known = sorted(p.name for p in (self.k8s_dir / "overlays").iterdir()) if self.k8s_dir.is_dir() else []
            raise ValueError(f"no overlay {self.name!r} in {self.k8s_dir} (overlays: {', '.join(known) or 'none'})")
        config: Any = {}
        for path in self.sources:
            config = merge(config, load_serve_config(path) if path.is_file() else {})
        try:
            check_serve_config(config)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"overlay {self.name}: invalid Serve config: {exc}") from exc
        return config

    def generated_text(self) -> str:
        sources = " + ".join(str(p.relative_to(self.k8s_dir.parent)) for p in self.sources)
        patch = {"apiVersion": RAYSERVICE_API[0], "kind": RAYSERVICE_API[1], "metadata": {"name": RAYSERVICE_NAME},
                 "spec": {"serveConfigV2": dump(self.serve_config())}}
        return (f"# GENERATED from {sources}\n"
                f"# by `rvc-serve k8s render {self.name} --update`. Do not edit: tests fail when it drifts.\n"
                + dump(patch))

    def is_current(self) -> bool:
        expected = self.generated_text()  # first: it refuses a missing overlay or a bad config
        return self.generated_path.is_file() and self.generated_path.read_text() == expected

    def update(self) -> bool:
        """Rewrite the generated patch from its sources; True when it changed."""
        if self.is_current():
            return False
        self.generated_path.write_text(self.generated_text())
        return True

    def render(self) -> list[dict]:
        """The overlay's objects, as `kubectl kustomize` builds them."""
        if not self.is_current():
            raise ValueError(f"{self.generated_path} does not match serve_config.yaml and the serve-values; "
                             f"run `rvc-serve k8s render {self.name} --update`")
        return [doc for doc in yaml.safe_load_all(kustomize(self.directory)) if doc]


def kustomize(directory: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ValueError("kubectl is not installed: it renders the kustomize overlays (`kubectl kustomize`)")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ValueError(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return done.stdout


def rayservice(objects: list[dict]) -> dict:
    """The one RayService among rendered objects."""
    found = [o for o in objects if (o.get("apiVersion"), o.get("kind")) == RAYSERVICE_API]
    if len(found) != 1:
        raise ValueError(f"expected one RayService in the rendered overlay, found {len(found)}")
    return found[0]
