"""gateway.runtime: the arrows between modules point one way, and what serve builds from
the rules is built (or refused) in one place."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.rules import parse_rules
from gateway.runtime import GC_THRESHOLDS, check_serving, tune_gc

PACKAGE = Path(__file__).parent.parent / "gateway"


def imports() -> dict[str, set[str]]:
    """Each gateway module and the gateway modules it imports, at the top or in a function
    (``TYPE_CHECKING`` imports too: a cycle for the type checker is still a cycle)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m.startswith("gateway")} - {name}
    return graph


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize(
    "module", ["gateway.cli", "gateway.demo", "gateway.runtime", "gateway.workers"]
)
def test_no_module_imports_one_that_imports_it_back(module: str) -> None:
    graph = imports()
    assert module not in reaches(graph, module)


def test_the_app_may_use_the_runtime() -> None:
    assert {"gateway.app", "gateway.cli", "gateway.demo"} & reaches(
        imports(), "gateway.runtime"
    ) == set()


def test_nothing_imports_the_command() -> None:
    graph = imports()
    assert [m for m, deps in graph.items() if "gateway.cli" in deps] == []


def test_rules_modules_import_downwards() -> None:
    graph = imports()
    inside = {m: {d for d in deps if d.startswith("gateway.rules.")} for m, deps in graph.items()}
    for module in (m for m in graph if m.startswith("gateway.rules.")):
        assert module not in reaches(inside, module)


RS256_WITHOUT_ITS_KEY = b"""
auth: {algorithms: [RS256], public_key_file: /nonexistent/key.pem}
upstreams: {ai: {url: "http://127.0.0.1:9100"}}
token_types: {general: {}}
plans: {pro: {allowance: {general: 1}}}
"""
HS256 = b"""
upstreams: {ai: {url: "http://127.0.0.1:9100"}}
token_types: {general: {}}
plans: {pro: {allowance: {general: 1}}}
"""


async def test_check_serving_names_the_file_and_the_key() -> None:
    rules = parse_rules(RS256_WITHOUT_ITS_KEY, "prod.yaml")
    with pytest.raises(ConfigError) as info:
        await check_serving(rules, {})
    assert str(info.value) == (
        "prod.yaml: auth.public_key_file: cannot read /nonexistent/key.pem: "
        "No such file or directory"
    )


async def test_check_serving_needs_the_secret_serve_needs() -> None:
    rules = parse_rules(HS256, "prod.yaml")
    with pytest.raises(ConfigError) as info:
        await check_serving(rules, {})
    assert info.value.errors == [
        "auth.secret_env: environment variable GATEWAY_JWT_SECRET is not set"
    ]
    await check_serving(rules, {"GATEWAY_JWT_SECRET": "s" * 32})


def test_serving_freezes_the_startup_heap_and_collects_less_often() -> None:
    thresholds = gc.get_threshold()
    try:
        tune_gc()
        # Everything alive now (this process's modules, the test session) is out of
        # every later collection; young objects are collected after 20,000 allocations.
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold() == GC_THRESHOLDS == (20_000, 20, 100)
        # Cyclic garbage made afterwards is still collected.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
