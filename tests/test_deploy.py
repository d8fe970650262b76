"""deploy/: the Kubernetes manifests parse, and what they ask of the gateway is what the
gateway does: the container's arguments are ones ``gateway serve`` accepts, the probes
are paths the app serves, and a ConfigMap update (kubelet's symlink swap) reloads the
rules."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from gateway import app as app_module
from gateway.app import build_app
from gateway.cli import build_parser
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.pipeline import handle
from gateway.rules import load_rules
from gateway.state import STATE
from tests.conftest import ENVIRON, rules_yaml

REPO = Path(__file__).parent.parent
DEPLOY = REPO / "deploy"
SECRET_VARIABLES = ("DATABASE_URL", "REDIS_URL", "GATEWAY_JWT_SECRET")


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def only(kind: str) -> dict[str, Any]:
    [doc] = [doc for _, doc in documents() if doc["kind"] == kind]
    return doc


def container() -> dict[str, Any]:
    [gateway] = only("Deployment")["spec"]["template"]["spec"]["containers"]
    return gateway


def env() -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container()["env"]}


def probes() -> dict[str, dict[str, Any]]:
    return {k: container()[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}


def test_every_manifest_parses_and_says_what_it_is() -> None:
    found = list(documents())
    assert {doc["kind"] for _, doc in found} == {"Deployment", "Service", "PodDisruptionBudget"}
    for path, doc in found:
        assert doc["apiVersion"] and doc["metadata"]["name"] == "metering-gateway", path


def test_three_replicas_two_kept_by_the_budget_and_all_behind_the_service() -> None:
    deployment = only("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    budget = only("PodDisruptionBudget")["spec"]
    assert budget["minAvailable"] == 2
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    service = only("Service")["spec"]
    assert service["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["ports"]] == ["http"]


def test_the_container_runs_what_serve_accepts() -> None:
    gateway = container()
    assert gateway["command"] == ["gateway"]
    args = build_parser().parse_args(gateway["args"])
    assert (args.command, args.host, args.workers) == ("serve", "0.0.0.0", 2)
    [port] = gateway["ports"]
    assert (port["name"], port["containerPort"]) == ("http", args.port)
    assert {p["httpGet"]["port"] for p in probes().values()} == {"http"}


async def test_the_probes_ask_paths_the_app_serves(ledger: Ledger, limiter: Limiter) -> None:
    rules = load_rules(REPO / "rules.yaml")
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    paths = {kind: probe["httpGet"]["path"] for kind, probe in probes().items()}
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for path in set(paths.values()):
        match = await app.router.resolve(make_mocked_request("GET", path))
        assert match.handler is not handle, f"{path} would be proxied, not answered"
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for path in set(paths.values()):
            resp = await client.get(path)
            assert resp.status == 200, (path, await resp.text())


def test_the_grace_period_outlasts_the_longest_upstream_timeout() -> None:
    """SIGTERM comes after preStop; serve then drains for up to the longest upstream
    timeout plus 5 s before it settles and exits."""
    spec = only("Deployment")["spec"]["template"]["spec"]
    pause = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    rules = load_rules(REPO / "rules.yaml")
    longest = max(r.upstream.timeout_seconds for r in rules.routes)
    assert spec["terminationGracePeriodSeconds"] > int(pause[1]) + longest + 5


def test_the_secrets_come_from_a_secret() -> None:
    rules = load_rules(REPO / "rules.yaml")
    assert rules.document.auth.secret_env in SECRET_VARIABLES
    variables = env()
    for name in SECRET_VARIABLES:
        ref = variables[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref.get("optional", False)) == (
            "metering-gateway",
            name,
            False,
        )
    assert [s["secretRef"]["name"] for s in container()["envFrom"]] == ["metering-gateway"]


def test_the_rules_come_from_a_configmap_mounted_as_a_directory() -> None:
    """A subPath mount is a copy kubelet never updates; a directory mount follows the
    ConfigMap through its ..data symlink."""
    spec = only("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    [rules] = [name for name, v in volumes.items() if "configMap" in v]
    assert "subPath" not in mounts[rules]
    rules_file = Path(env()["GATEWAY_RULES"]["value"])
    assert rules_file.parent == Path(mounts[rules]["mountPath"])
    # The root filesystem is read-only: the data directory must be a volume.
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    data_dir = env()["GATEWAY_DATA_DIR"]["value"]
    [data] = [m for m in mounts.values() if m["mountPath"] == data_dir]
    assert "emptyDir" in volumes[data["name"]]


class ConfigMapVolume:
    """A directory laid out as kubelet lays out a ConfigMap volume, updated as kubelet
    updates it: the files in a timestamped directory, ``..data`` a symlink to it, each key
    a symlink through ``..data``; an update writes a new directory and renames a new
    ``..data`` over the old one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0

    def write(self, files: dict[str, str]) -> None:
        self.generation += 1
        new = self.root / f"..2026_01_01_00_00_{self.generation:02d}.000000001"
        new.mkdir()
        for name, text in files.items():
            (new / name).write_text(text)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        (self.root / "..data_tmp").symlink_to(new.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")
        for name in files:
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(Path("..data") / name)
        if old is not None:
            shutil.rmtree(old)


async def test_a_configmap_update_reloads_the_rules(
    tmp_path: Path,
    ledger: Ledger,
    limiter: Limiter,
    upstream: tuple[Any, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app_module, "WATCH_INTERVAL_SECONDS", 0.1)
    volume = ConfigMapVolume(tmp_path)
    text = rules_yaml(upstream[1])
    volume.write({"rules.yaml": text})
    path = tmp_path / "rules.yaml"
    app = build_app(load_rules(path), ledger, limiter, environ=ENVIRON, sweeper=False, watch=path)
    state = app[STATE]
    before = state.rules.version
    async with TestClient(TestServer(app, host="127.0.0.1")):
        await asyncio.sleep(0.3)  # the watcher has seen the first file
        changed = text.replace("cost: 5", "cost: 6", 1)
        assert changed != text
        volume.write({"rules.yaml": changed})
        for _ in range(100):
            if state.rules.version != before:
                break
            await asyncio.sleep(0.05)
        reloads = state.metrics.registry.get_sample_value(
            "gateway_rules_reloads_total", {"outcome": "ok"}
        )
    assert state.rules.version == load_rules(path).version != before
    assert reloads == 1.0
