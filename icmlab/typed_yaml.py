"""Typed dataclasses from YAML mappings: dotted overrides, type checks that collect every problem.

The generic half of :mod:`icmlab.config`: it knows nothing about runs, only how to turn nested
dicts (a YAML file, papermill ``-f`` sections, CLI ``--set key=value`` overrides) into a tree of
dataclasses whose field annotations it checks, appending one readable message per problem to an
``errors`` list instead of raising on the first::

    errors = []
    cfg = build_dataclass(RunConfig, {"train": {"lr": "fast"}}, "", errors)
    errors  # ["train.lr: expected a number, got 'fast'"]

:func:`load_yaml_file` is the strict reader of a YAML file: a repeated key is an error naming the
file, the line and the key (PyYAML silently keeps the last one), and a file that is not UTF-8 is
an error naming the file and the byte.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

#: A number as YAML 1.2 writes it; YAML 1.1 (PyYAML) reads ``1e-5`` (no dot) as a string.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class YamlFileError(ValueError):
    """A YAML file could not be read as a mapping: the message names the file (and line)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlFileError(
                    f"{key_node.start_mark.name}:{line}: duplicate key {key!r} (first set on line {seen[key]}); "
                    "YAML would silently keep the last one: delete one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml_file(path: Path) -> Any:
    """Parse a YAML file strictly (duplicate keys refused, UTF-8 required).

    Raises:
        YamlFileError: not UTF-8 (with the byte offset), not valid YAML, or a duplicate key (with its line).
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlFileError(
            f"{path}: not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}); save the file as UTF-8"
        ) from None
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise YamlFileError(f"{path}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


def apply_override(data: dict, key: str, value: Any, errors: list[str]) -> None:
    """Set dotted ``key`` in nested ``data``; string values are read as YAML scalars (CLI ``--set``)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            pass
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string; the CLI user meant a number
            try:
                value = float(value)
            except ValueError:
                pass
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            errors.append(f"override {key!r}: {part!r} is not a section")
            return
        node = nxt
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, type-checking every field; problems go to ``errors``
    as ``"<dotted key>: <what is wrong>; <what is allowed>"`` and never raise."""
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or '<top>'}: expected a mapping of keys, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source_file"}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            errors.append(f"{dotted}: unknown key{hint}; allowed keys here: {', '.join(sorted(known))}")
            continue
        kwargs[key] = coerce(hints[key], value, dotted, errors)
    return cls(**kwargs)


def coerce(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    """Check ``value`` against type ``tp`` (dataclasses, unions, Literal, list, dict, scalars, Path)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key + ".", errors)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key, errors)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            errors.append(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return []
        (item_tp,) = get_args(tp)
        return [coerce(item_tp, v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return {}
        _, val_tp = get_args(tp)
        return {str(k): coerce(val_tp, v, f"{key}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # "1e-5": a number to the user, a string to YAML 1.1
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            errors.append(f"{key}: expected a path, got {value!r}")
            return Path(".")
        return Path(value)
    return value


def to_plain(obj: Any) -> Any:
    """Dataclasses and Paths → plain dicts, lists and strings (for YAML/JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    return obj


def deepcopy_plain(obj: Any) -> Any:
    """Copy nested dicts and lists (the leaves are immutable YAML scalars)."""
    if isinstance(obj, dict):
        return {k: deepcopy_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [deepcopy_plain(v) for v in obj]
    return obj
