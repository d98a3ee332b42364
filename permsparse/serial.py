"""Typed records (dataclasses): their fields with command-line help, their checked choices, and strict
conversion to and from JSON-ready dicts.

Configs and checkpoint records are dataclasses; on disk they are plain JSON. Reading is strict: a
missing field, an unknown field or a value of the wrong type is an error that names the field, never
a silent default. A field typed as a union of dataclasses (a permutation that is a search or a learned
one) is written with a ``"kind"`` tag, the class's ``KIND``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union


class RecordError(ValueError):
    """A dict does not match the record it is read as; the message names the field."""


def to_dict(record: Any) -> Any:
    """A dataclass (or a container of them) as JSON-ready values: tuples become lists."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        out = {}
        if hasattr(type(record), "KIND"):
            out["kind"] = type(record).KIND
        for f in dataclasses.fields(record):
            out[f.name] = to_dict(getattr(record, f.name))
        return out
    if isinstance(record, (list, tuple)):
        return [to_dict(v) for v in record]
    if isinstance(record, dict):
        return {str(k): to_dict(v) for k, v in record.items()}
    return record


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build ``cls`` from ``data`` (as :func:`to_dict` wrote it), checking every field and type."""
    return _convert(cls, data, where or cls.__name__)


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        tagged = [a for a in options if dataclasses.is_dataclass(a) and hasattr(a, "KIND")]
        if tagged and isinstance(value, dict):
            for option in tagged:
                if value.get("kind") == option.KIND:
                    return _dataclass(option, value, where)
            raise RecordError(f"{where}: kind {value.get('kind')!r} is not one of {[a.KIND for a in tagged]}")
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except RecordError as err:
                errors.append(str(err))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if origin is Literal:
        if value not in args:
            raise RecordError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecordError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        if item in (int, str, bool, float) and all(type(v) is item for v in value):
            items = list(value)  # already exact: a permutation of thousands of ints is read at once
        else:
            items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(kind):
        return _dataclass(kind, value, where)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind in (int, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RecordError(f"{where}: expected {kind.__name__}, got {value!r}")
        return value
    if kind is type(None):
        if value is not None:
            raise RecordError(f"{where}: expected null, got {value!r}")
        return None
    raise RecordError(f"{where}: cannot read a value of type {kind!r}")


def _dataclass(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    given = {k for k in value if k != "kind" or not hasattr(cls, "KIND")}
    missing = [n for n in names if n not in given]
    unknown = sorted(given - set(names))
    if missing:
        raise RecordError(f"{where}: missing field(s) {missing}")
    if unknown:
        raise RecordError(f"{where}: unknown field(s) {unknown}")
    try:
        return cls(**{n: _convert(hints[n], value[n], f"{where}.{n}") for n in names})
    except (TypeError, ValueError) as err:
        if isinstance(err, RecordError):
            raise
        raise RecordError(f"{where}: {err}") from err


def option(default, help: str, flag: str | None = None):
    """A config field with its command-line help (and flag, when it is not ``--field-name``)."""
    metadata = {"help": help} if flag is None else {"help": help, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_choices(record) -> None:
    """Every ``Literal`` field of ``record`` holds one of its values."""
    hints = typing.get_type_hints(type(record))
    for f in dataclasses.fields(record):
        kind = hints[f.name]
        if typing.get_origin(kind) is Literal and getattr(record, f.name) not in typing.get_args(kind):
            choices = ", ".join(map(str, typing.get_args(kind)))
            raise ValueError(f"unknown {f.name.replace('_', ' ')} {getattr(record, f.name)!r}; choose one of {choices}")
