"""Strict validation of a Serve config (serve_config.yaml, or a RayService's serveConfigV2).

Ray's own schema accepts and ignores misspelt keys; this check reports every key that Ray's
models do not define, and validates our application's args with the builder's own model.
"""
from __future__ import annotations

import typing
from pathlib import Path

import yaml
from pydantic import BaseModel
from ray.serve.schema import ServeDeploySchema

from .settings import AppSettings

BUILDER = "deployments.app:build_app"


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is not None:  # Optional[...], X | Y, list[...]
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def unknown_keys(model: type[BaseModel], data: dict, where: str = "") -> list[str]:
    """Dotted paths of the keys in `data` that `model` (recursively) does not define."""
    fields = {(field.alias or name): field for name, field in model.model_fields.items()}
    problems = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        field = fields.get(key)
        if field is None:
            problems.append(path)
            continue
        models = _models_in(field.annotation)
        if len(models) != 1:
            continue  # a plain dict (runtime_env, ray_actor_options) or an ambiguous union
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, dict):
                problems += unknown_keys(models[0], item, f"{path}[{i}]" if isinstance(value, list) else path)
    return problems


def check_serve_config(config: dict) -> list[AppSettings]:
    """Validate with Ray's schema, refuse unknown keys, and validate our builder's args.
    Returns the settings of each application that uses our builder; raises ValueError."""
    ServeDeploySchema.model_validate(config)
    problems = unknown_keys(ServeDeploySchema, config)
    if problems:
        raise ValueError(f"unknown keys in the Serve config: {', '.join(problems)}")
    return [AppSettings.model_validate(app.get("args") or {})
            for app in config["applications"] if app.get("import_path") == BUILDER]


def load_serve_config(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())
