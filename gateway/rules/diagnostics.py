"""Diagnostics: each problem as ``path: what is wrong``, in the order of the file.

A problem is found at a ``Loc`` (the keys and indexes leading to the value, as pydantic
gives them); it is reported at its path (``routes[3].cost``) and sorted by the line the
value starts on.
"""

from __future__ import annotations

import difflib
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

from gateway.rules.schema import RulesDocument, describe

Loc = tuple[int | str, ...]
Lines = dict[tuple[str, ...], int]  # where each key or item starts, by its path


def format_errors(errors: list[tuple[Loc, str]], data: Any, lines: Lines) -> list[str]:
    """``path: message`` for each error once, in the order of the file."""

    def line(loc: Loc) -> int:
        parts = tuple(map(str, loc))
        for end in range(len(parts), 0, -1):
            if parts[:end] in lines:
                return lines[parts[:end]]
        return 0

    ordered = sorted(errors, key=lambda error: line(error[0]))  # stable: same line, found order
    return list(dict.fromkeys(f"{_path(loc, data)}: {message}" for loc, message in ordered))


def _path(loc: Loc, data: Any) -> str:
    """``routes[3].cost``: the document is walked alongside so that an integer mapping key
    (``2024:``) is not mistaken for a list index."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not (isinstance(data, dict) and part in data):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _key(part)
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            data = None
    return out or "(document)"


def _key(key: object) -> str:
    if key is None or isinstance(key, bool):
        return describe(key)
    return str(key)


_EXPECTED = {
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "list_type": "must be a list",
    "float_type": "must be a number",
}


def schema_error(error: Any) -> tuple[Loc, str]:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    loc: Loc = tuple(error["loc"])
    if loc and loc[-1] == "[key]":
        return loc[:-1], f"key must be a string, got {describe(error['input'])}"
    if kind in _EXPECTED:
        return loc, f"{_EXPECTED[kind]}, got {describe(error['input'])}"
    if kind == "missing":
        message = "is required"
    elif kind == "extra_forbidden":
        message = "unknown key" + _known_keys(loc)
    elif kind == "greater_than" and ctx.get("gt") == 0:
        message = "must be a positive " + ("integer" if isinstance(ctx["gt"], int) else "number")
    elif kind == "greater_than":
        message = f"must be greater than {ctx.get('gt')}"
    elif kind == "greater_than_equal" and ctx.get("ge") == 0:
        message = "must not be negative"
    elif kind == "finite_number":
        message = "must be a finite number"
    elif kind == "literal_error":
        given = error["input"]
        message = f"must be one of {ctx.get('expected')}, got " + (
            repr(given) if isinstance(given, str) else describe(given)
        )
    elif kind == "too_short":
        message = "must not be empty"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    else:
        message = str(error["msg"])
    return loc, message


def _known_keys(loc: Loc) -> str:
    """`` (did you mean 'cost'?)`` or the keys allowed where ``loc`` names an unknown one."""
    annotation: Any = RulesDocument
    for part in loc[:-1]:
        annotation = _unoptional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return ""
            annotation = field.annotation
        elif get_origin(annotation) in (list, dict):
            annotation = get_args(annotation)[-1]
        else:
            return ""
    annotation = _unoptional(annotation)
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return ""
    known = list(annotation.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (expected one of {', '.join(known)})"


def _unoptional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation
