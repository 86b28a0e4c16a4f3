"""The run config as text: a TOML writer (`tomllib` only reads) and the list of keys
that `wsss train --help-config` prints.

A key's documentation is its trailing comment in the dataclass source (`TrainConfig`
in `config.py`, each method's `Config`), read here with `tokenize`: the comment stays
the one place a key is explained.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import typing

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value) -> str:
    """One value of a config as TOML. None is written as "none", which the config's
    loader reads back as None for the fields that may be None."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest repr that reads back as the same float
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML config value")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def to_toml(config: dict) -> str:
    """`TrainConfig.to_dict()` as a TOML file: run keys at the top, one table per method section."""
    sections = config.get("sections") or {}
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in config.items() if k != "sections"]
    for name, values in sections.items():
        lines += ["", f"[{toml_key(name)}]"]
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment at the end of its line in the class source ('' if none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    (node,) = ast.parse(source).body
    out = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            out[item.target.id] = comments.get(item.end_lineno, "")
    return out


def type_name(kind) -> str:
    if isinstance(kind, type) and not typing.get_args(kind):
        return kind.__name__
    return str(kind).replace("typing.", "")


def describe_fields(cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """(key, type, default, comment) for every field of config dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = []
    for item in dataclasses.fields(cls):
        if item.name in skip:
            continue
        if item.default is not dataclasses.MISSING:
            default = toml_value(item.default)
        elif item.default_factory is not dataclasses.MISSING:
            default = toml_value(item.default_factory())
        else:
            default = "(required)"
        rows.append((prefix + item.name, type_name(hints[item.name]), default, comments.get(item.name, "")))
    return rows


def format_rows(rows: list[tuple[str, str, str, str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"  {key:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {comment}".rstrip()
            for key, kind, default, comment in rows]


def help_config(train_config: type, sections: dict[str, type]) -> str:
    """What `wsss train [--method M] --help-config` prints: every run key, then every key of
    the method's sections."""
    lines = ["Run keys (KEY=VALUE on the command line; top-level keys of a --config TOML file):",
             *format_rows(describe_fields(train_config, skip=("sections",)))]
    for name, cls in sections.items():
        lines += ["", f"Keys of method part {name!r} ({name}.KEY=VALUE; a [{name}] table in a --config file):",
                  *format_rows(describe_fields(cls, prefix=f"{name}."))]
    if not sections:
        lines += ["", "Method keys: add --method (e.g. --method lnl+fsae) to list its sections' keys."]
    return "\n".join(lines)
