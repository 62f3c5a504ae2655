"""A lab file read with its line numbers and checked against lab.schema.json.

PyYAML composes the file into nodes (each with its line); they are turned into plain Python
values (dict, list, str, int, float, bool, None) and a map from each value's path (the keys
and indexes that lead to it) to its line. jsonschema validates the values; each error is
turned into a LabError naming the file, the line and the key path.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from kh.errors import UsageError

MAX_BYTES = 1 << 20  # a lab file is small; anything bigger is refused unread
MAX_VALUES = 100_000  # values in a file, aliases expanded (a "billion laughs" file is refused)
Path_ = tuple[str | int, ...]


class LabError(UsageError):
    """A lab file is malformed or asks for something impossible: ``FILE:LINE: KEY: what``."""


@dataclass(frozen=True)
class Source:
    """The file's values and where each came from."""

    path: Path
    data: dict[str, Any]
    lines: dict[Path_, int]  # path of keys/indexes -> 1-based line

    def line(self, where: Path_) -> int:
        """The line of ``where``, or of the nearest enclosing value that has one."""
        w = tuple(where)
        while w and w not in self.lines:
            w = w[:-1]
        return self.lines.get(w, 1)

    def error(self, where: Path_, message: str, hint: str | None = None) -> LabError:
        """A LabError ``FILE:LINE: key a.b[2]: message``."""
        key = keypath(where)
        return LabError(f"{self.path}:{self.line(where)}: "
                        f"{'key ' + key + ': ' if key else ''}{message}", hint)


def keypath(where: Path_) -> str:
    """('groups', 'fs', 'after', 0) -> 'groups.fs.after[0]'."""
    out = ""
    for p in where:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@functools.cache
def schema() -> dict[str, Any]:
    """lab.schema.json (shipped beside this module, for editors too)."""
    text = resources.files("kh.lab").joinpath("lab.schema.json").read_text()
    s: dict[str, Any] = json.loads(text)
    return s


def read(path: Path) -> Source:
    """Read and schema-check ``path``. LabError (file, line, key) for a file that cannot be
    read, is not YAML, has a duplicate key, or breaks the schema (the first error by line)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise LabError(f"{path}: cannot read the lab file: {e.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise LabError(f"{path}: the lab file is over {MAX_BYTES} bytes")
    try:
        text = raw.decode()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except UnicodeDecodeError:
        raise LabError(f"{path}: the lab file is not UTF-8") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise LabError(f"{path}:{line}: not YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise LabError(f"{path}: not YAML: {e}") from None
    lines: dict[Path_, int] = {}
    data = _value(path, node, (), lines, [0]) if node is not None else None
    src = Source(path, data if isinstance(data, dict) else {}, lines)
    if not isinstance(data, dict):
        raise src.error((), "a lab file is a mapping (principals:, groups:, ...)")
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(data),
                    key=lambda e: (src.line(tuple(e.absolute_path)), len(e.absolute_path)))
    if errors:
        raise _schema_error(src, errors[0])
    return src


def _schema_error(src: Source, e: jsonschema.ValidationError) -> LabError:
    where = tuple(e.absolute_path)
    if e.validator == "additionalProperties" and isinstance(e.instance, dict):
        allowed = set((e.schema.get("properties") or {}).keys())
        extra = sorted(k for k in e.instance if k not in allowed)
        if extra and allowed:
            return src.error((*where, extra[0]), f"unknown key {extra[0]!r}",
                             "known here: " + ", ".join(sorted(allowed)))
    if e.validator == "propertyNames":
        return src.error(where, f"bad name: {e.message}")
    if e.validator == "type":
        return src.error(where, f"{_short(e.instance)} is not of type {e.validator_value}")
    message = e.message
    shown = repr(e.instance)
    if message.startswith(shown):  # jsonschema begins with the whole value: say what is wrong
        message = _short(e.instance) + message[len(shown):]
    return src.error(where, message[:300])


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _value(path: Path, node: yaml.Node, where: Path_, lines: dict[Path_, int],
           seen: list[int]) -> Any:
    seen[0] += 1
    if seen[0] > MAX_VALUES:
        raise LabError(f"{path}:{node.start_mark.line + 1}: over {MAX_VALUES} values "
                       "(aliases expanded)")
    lines[where] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for k, v in node.value:
            # a key is its text: YAML 1.1 would make `on:` (a check's key) the boolean True
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise LabError(f"{path}:{k.start_mark.line + 1}: key {keypath(where) or '.'}: "
                               f"keys are names, not {_short(key)}")
            if key in out:
                raise LabError(f"{path}:{k.start_mark.line + 1}: key "
                               f"{keypath((*where, key))}: given twice")
            out[key] = _value(path, v, (*where, key), lines, seen)
            lines[(*where, key)] = k.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_value(path, v, (*where, i), lines, seen) for i, v in enumerate(node.value)]
    return yaml.SafeLoader(" ").construct_object(node)
