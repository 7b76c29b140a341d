"""Typed job configs: pydantic models that load from YAML and refuse unknown keys."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tkllm_ray.errors import TkllmError

T = TypeVar("T", bound="ConfigModel")


class ConfigModel(BaseModel):
    """Base of every config: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        return load_config(cls, path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def format_validation_error(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']}")
    return f"invalid config {where}: " + "; ".join(parts)


def load_config(cls: type[T], path: str | Path, overrides: dict | None = None) -> T:
    """Load a YAML file into `cls`, apply `overrides` (already-typed values), validate once."""
    p = Path(path)
    if not p.is_file():
        raise TkllmError(f"config file not found: {p} (pass an existing YAML file)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TkllmError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TkllmError(f"config file {p} must hold a mapping of options, got {type(data).__name__}")
    data = deep_merge(data, overrides or {})
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise TkllmError(format_validation_error(e, str(p))) from None


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
