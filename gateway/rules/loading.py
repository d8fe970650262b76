"""Loading rules.yaml: YAML with the line of every value, ``${VAR}`` interpolation, then
the schema and the cross-references, every problem reported at once.

``load_rules`` either returns a complete, cross-checked ``Rules`` or raises ``ConfigError``
listing every problem, each as ``path: what is wrong`` (``routes[3].cost: must be a
positive integer``). Unknown keys, keys given twice and values of the wrong type are
refused, so that a typo never silently changes behaviour.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.errors import ConfigError
from gateway.rules.diagnostics import Lines, Loc, format_errors, schema_error
from gateway.rules.references import reference_errors
from gateway.rules.routes import Rules, compile_routes
from gateway.rules.schema import RulesDocument, describe


def load_rules(path: str | Path) -> Rules:
    """Read, validate and compile a rules file. Raises ``ConfigError`` listing every error,
    each prefixed by ``path``."""
    source = str(path)
    try:
        raw_bytes = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from exc
    return parse_rules(raw_bytes, source)


def parse_rules(raw_bytes: bytes, source: str = "rules.yaml") -> Rules:
    """Validate and compile the rules in ``raw_bytes`` after replacing ``${VAR}`` and
    ``${VAR:-default}`` from the environment. Raises ``ConfigError`` (with ``source``)
    listing every error at once, in the order of the file, each as ``path: what is wrong``."""
    data, lines, errors = _load_yaml(raw_bytes, source)
    if data is None:
        raise ConfigError(source, ["(document): the file is empty"])
    if not isinstance(data, dict):
        raise ConfigError(
            source,
            [
                *format_errors(errors, data, lines),
                "(document): must be a mapping of sections (upstreams, token_types, plans, "
                f"routes, ...), got {describe(data)}",
            ],
        )

    env_errors: list[tuple[Loc, str]] = []
    values = _interpolate(data, (), env_errors)
    errors += env_errors
    document: RulesDocument | None = None
    try:
        # strict=True reaches the sections whose models are not strict themselves (limits).
        document = RulesDocument.model_validate(values, strict=True)
    except ValidationError as exc:
        for error in exc.errors():
            loc, message = schema_error(error)
            # A value whose variable is missing has already been reported once.
            if not any(loc[: len(bad)] == bad for bad, _ in env_errors):
                errors.append((loc, message))
    errors += reference_errors(values)
    if errors or document is None:
        raise ConfigError(source, format_errors(errors, data, lines))

    routes = compile_routes(document)
    version = hashlib.sha256(raw_bytes).hexdigest()[:12]
    return Rules(document=document, routes=routes, source=source, version=version)


def _load_yaml(raw_bytes: bytes, source: str) -> tuple[Any, Lines, list[tuple[Loc, str]]]:
    """The document, the line of each of its values, and the keys it gives twice (which
    plain YAML loading would silently resolve to the last one). Raises ``ConfigError`` when
    it is not YAML."""
    loader = yaml.SafeLoader(raw_bytes)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}, []
        lines: Lines = {}
        duplicates = _walk(node, (), lines, set())
        return loader.construct_document(node), lines, duplicates
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_error(exc)]) from exc
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.YAMLError) -> str:
    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    message = f"{at(mark)}: invalid YAML: {problem}" if mark else f"invalid YAML: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark and mark and context_mark.line != mark.line:
        # The problem is often noticed a line after the mistake: say where it began.
        message += f" ({context} started at {at(context_mark)})"
    return message


def _walk(node: yaml.Node, loc: Loc, lines: Lines, seen: set[int]) -> list[tuple[Loc, str]]:
    if id(node) in seen:  # an alias: already walked where its anchor is
        return []
    seen.add(id(node))
    lines.setdefault(tuple(map(str, loc)), node.start_mark.line + 1)
    errors: list[tuple[Loc, str]] = []
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            errors += _walk(item, (*loc, i), lines, seen)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line = key.start_mark.line + 1
            lines.setdefault(tuple(map(str, (*loc, key.value))), line)
            if (key.tag, key.value) in first_line:
                first = first_line[(key.tag, key.value)]
                errors.append(((*loc, key.value), f"key given twice (lines {first} and {line})"))
            else:
                first_line[(key.tag, key.value)] = line
            errors += _walk(value, (*loc, key.value), lines, seen)
    return errors


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, loc: Loc, errors: list[tuple[Loc, str]]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in string values from the environment. As in
    the shell, the default also applies when the variable is set but empty."""
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), errors) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    if "${" in _ENV_REF.sub("", value):
        errors.append((loc, "malformed variable reference: write ${NAME} or ${NAME:-default}"))
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = os.environ.get(name)
        if default is not None and not found:
            return default
        if found is None:
            errors.append((loc, f"environment variable {name} is not set"))
            return ""
        return found

    return _ENV_REF.sub(sub, value)
