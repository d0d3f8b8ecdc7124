"""Typed configuration: the strict pydantic base every config uses, YAML loading and `--set` overrides.

Every job, the model and the Serve app take one config object built from a subclass of
`StrictConfig`. Unknown keys and bad values fail at construction with pydantic's error, which names
the dotted field (``teacher.lr: Input should be greater than 0``). Overrides use dotted keys whose
values are parsed as YAML scalars/lists (``--set train.lr=1e-4 --set model.preset=tiny``).

This lives in `model/` because it is the bottom layer: `ray_jobs/` and `serving/` both import it,
and `model/` may import neither of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["StrictConfig", "ConfigError", "load_config", "apply_overrides", "parse_overrides"]

C = TypeVar("C", bound="StrictConfig")


class StrictConfig(BaseModel):
    """Base for all configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the offending key."""


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``["a.b=1", "c=[1,2]"]`` into ``{"a.b": 1, "c": [1, 2]}`` (values are YAML)."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key!r}: value {raw!r} is not valid YAML ({exc})") from exc
    return parsed


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted key set; intermediate dicts are created."""
    out = _deep_copy(data)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[: i + 1])!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: Iterable[str] | dict[str, Any] = (),
) -> C:
    """Build ``cls`` from a YAML file (optional) plus dotted overrides; raise ConfigError naming the key."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    data = apply_overrides(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(cls, path, exc)) from exc


def _format_validation_error(cls: type, path: Any, exc: ValidationError) -> str:
    lines = [f"invalid {cls.__name__}" + (f" from {path}" if path else "") + ":"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
