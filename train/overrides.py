"""Command-line overrides of typed config dataclasses: `--set key=value`, strictly.

Unknown keys and values of the wrong type fail loudly (a typo must never be silently ignored).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def _coerce(name: str, text: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, text, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={text!r}: expected a boolean (true/false)")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r}: expected an integer") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}={text!r}: expected a number") from None
    if typ is str:
        return text
    # containers (dict, list, tuple): JSON
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{name}={text!r}: expected JSON for type {typ}") from None
    if origin in (tuple,) and isinstance(value, list):
        value = tuple(value)
    want = origin or typ
    if isinstance(want, type) and not isinstance(value, want):
        raise ValueError(f"{name}={text!r}: expected {typ}, got {type(value).__name__}")
    return value


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """Return a copy of dataclass `config` with `key=value` overrides applied.

    Raises ValueError naming the key for an unknown key, a malformed item or a wrong type.
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError("apply_overrides takes a dataclass instance")
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config) if f.init}
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            close = sorted(fields, key=lambda f: -_similarity(f, key))[:3]
            raise ValueError(f"unknown setting {key!r} for {type(config).__name__}; did you mean one of {close}?")
        changes[key] = _coerce(key, text.strip(), hints[key])
    return dataclasses.replace(config, **changes)


def _similarity(a: str, b: str) -> float:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio()
