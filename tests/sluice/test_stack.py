"""The embedded stack on a private state folder: idempotent up, clean down, durable Redis.

One private stack for the whole module (a JVM start costs ~10 s); the shared session
``stack`` is never stopped here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from kafka import KafkaProducer

from schemas.errors import SluiceError
from sluice.cli import cli
from sluice.errors import SettingsError, StackError
from sluice.ports import free_port, free_port_block
from sluice.redis_cluster import SLOTS, slot_ranges
from sluice.settings import Settings, load_settings
from sluice.stack import Stack, with_redis_cluster
from streams.config import cluster_nodes
from streams.connections import kafka_client_options, redis_client
from tests.conftest import stack_settings
from tests.streams.kafka_io import consume_all


def _with_ports(settings: Settings, **ports: int) -> Settings:
    # Loaded again, not copied: the embedded addresses are derived from the ports at load.
    return load_settings(state_dir=str(settings.state_dir),
                         stack=settings.stack.model_copy(update=ports).model_dump())


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port with a listening socket on it: what another program looks like."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _processes_in(folder: Path) -> list[int]:
    """Pids of the processes whose working folder is under ``folder`` (the stack starts
    Kafka and Redis there; Redis rewrites its command line, so cwd is the reliable mark)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            found.append(int(entry.name))
    return found


def _is_ours(pid: int, marker: str) -> bool:
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.parametrize(("port_name", "component"), [
    ("redis_port", "redis"), ("kafka_port", "kafka"), ("controller_port", "Kafka controller")])
def test_a_taken_port_is_a_clear_error(tmp_path: Path, taken_port: int, port_name: str,
                                       component: str) -> None:
    settings = _with_ports(stack_settings(str(tmp_path)), **{port_name: taken_port})
    embedded = Stack(settings)
    try:
        with pytest.raises(StackError) as caught:
            embedded.up()
        message = str(caught.value)
        assert f"port {taken_port}" in message
        assert f"stack.{port_name}" in message
        assert f"SLUICE_STACK__{port_name.upper()}" in message
        assert component in message
    finally:
        embedded.down()  # Redis starts before Kafka finds its port taken
    assert _processes_in(settings.state_dir) == []


def test_an_external_service_has_no_embedded_stack(tmp_path: Path) -> None:
    settings = stack_settings(str(tmp_path), redis={"url": "redis://cache:6379/0"})
    with pytest.raises(StackError, match="existing service"):
        Stack(settings)


@pytest.mark.integration
def test_lifecycle_up_up_down_up(tmp_path: Path) -> None:
    settings = stack_settings(str(tmp_path / "state"))
    embedded = Stack(settings)
    key = f"test-stack:{uuid.uuid4().hex}"
    try:
        assert embedded.up() == {"redis": True, "kafka": True}
        first = {c.name: c for c in embedded.status()}
        assert all(c.running and c.answering for c in first.values())
        pids = {name: c.pid for name, c in first.items()}
        assert None not in pids.values()
        ports = json.loads((settings.state_dir / "ports.json").read_text())
        assert ports == {"kafka": settings.stack.kafka_port, "redis": settings.stack.redis_port,
                         "controller": settings.stack.controller_port}

        # A second `up` starts nothing and leaves the same processes answering.
        assert embedded.up() == {"redis": False, "kafka": False}
        again = {c.name: c for c in embedded.status()}
        assert {n: c.pid for n, c in again.items()} == pids
        assert all(c.answering for c in again.values())

        # Data written before `down`: a Redis key (AOF) and a Kafka record (its log).
        client = redis.Redis.from_url(settings.redis_url)
        client.set(key, "survives")
        client.hset(f"{key}:h", mapping={"a": "1", "b": "2"})
        client.close()
        producer = KafkaProducer(**kafka_client_options(settings.kafka), acks="all")
        producer.send(settings.topics.raw, key=b"k", value=b"kept").get(timeout=30)
        producer.close()

        assert embedded.down() == {"kafka": True, "redis": True}
        for name, pid in pids.items():
            assert pid is not None
            assert not _is_ours(pid, "kafka.Kafka" if name == "kafka" else "redis-server")
        assert _processes_in(settings.state_dir) == []
        assert not list(settings.state_dir.glob("*.pid"))
        down = embedded.status()
        assert [(c.name, c.pid, c.running, c.answering) for c in down] == [
            ("kafka", None, False, False), ("redis", None, False, False)]
        result = CliRunner().invoke(cli, ["status"], obj=settings)
        assert result.exit_code == 3
        assert [line.split()[:2] for line in result.output.splitlines()[:2]] == [
            ["kafka", "down"], ["redis", "down"]]
        assert embedded.down() == {"kafka": False, "redis": False}  # harmless when down

        assert embedded.up() == {"redis": True, "kafka": True}
        client = redis.Redis.from_url(settings.redis_url)
        assert client.get(key) == b"survives"
        assert client.hgetall(f"{key}:h") == {b"a": b"1", b"b": b"2"}
        client.close()
        (record,) = consume_all(settings, settings.topics.raw, 1)
        assert (record.key, record.value) == (b"k", b"kept")
    finally:
        embedded.down()
    assert _processes_in(settings.state_dir) == []


def test_status_of_a_stack_never_started(tmp_path: Path) -> None:
    settings = stack_settings(str(tmp_path / "never"))
    statuses = Stack(settings).status()
    assert [(c.name, c.running, c.answering) for c in statuses] == [
        ("kafka", False, False), ("redis", False, False)]
    assert statuses[1].address == f"127.0.0.1:{settings.stack.redis_port}"


@pytest.mark.integration
def test_embedded_redis_syncs_every_write_before_answering(client: redis.Redis) -> None:
    """README's delivery guarantee rests on it: an admission a worker was told about is on
    disk (``python -m bench.durability`` measures what ``everysec`` would lose)."""
    config = {**client.config_get("appendonly"), **client.config_get("appendfsync")}
    assert {str(k): str(v) for k, v in config.items()} == {"appendonly": "yes",
                                                           "appendfsync": "always"}


# -- the embedded Redis Cluster (`sluice up --redis-cluster N`) -----------------------------


def test_slot_ranges_cover_every_slot_once() -> None:
    for masters in (1, 2, 3, 7, 16):
        ranges = slot_ranges(masters)
        slots = [s for low, high in ranges for s in range(low, high + 1)]
        assert slots == list(range(SLOTS))
        sizes = [high - low + 1 for low, high in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least one master"):
        slot_ranges(0)


def test_cluster_settings_name_the_masters_and_refuse_bad_urls(tmp_path: Path) -> None:
    settings = load_settings(state_dir=str(tmp_path), stack={"redis_cluster": 3,
                                                             "redis_cluster_port": 7100})
    assert settings.redis.url == "redis+cluster://127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102"
    assert settings.redis.cluster and settings.embedded
    assert cluster_nodes("redis+cluster://a:1, [::1]:2/") == [("a", 1), ("::1", 2)]
    for url, why in [("redis+cluster://a:1,b", "'b' is not host:port"),
                     ("redis+cluster://:pw@a:1", "redis.password"),
                     ("redis+cluster://a:1/2", "one database"),
                     ("redis+cluster://a:99999", "not host:port")]:
        with pytest.raises(SettingsError, match=re.escape(why)):
            load_settings(state_dir=str(tmp_path), redis={"url": url})
    with pytest.raises(SettingsError, match="cluster bus"):  # bus ports past 65535
        load_settings(state_dir=str(tmp_path), stack={"redis_cluster": 3,
                                                      "redis_cluster_port": 60000})
    with pytest.raises(SettingsError, match="both port"):  # a master on the Kafka port
        load_settings(state_dir=str(tmp_path), stack={"redis_cluster": 2, "kafka_port": 7001,
                                                      "redis_cluster_port": 7000})


def test_a_cluster_url_that_no_node_answers_is_a_clear_error(tmp_path: Path) -> None:
    settings = load_settings(state_dir=str(tmp_path),
                             redis={"url": f"redis+cluster://127.0.0.1:{free_port()}"})
    with pytest.raises(SluiceError, match="no node of the Redis Cluster answers"):
        redis_client(settings.redis)


@pytest.mark.integration
def test_cluster_lifecycle_up_down_up_through_the_cli(tmp_path: Path) -> None:
    """`sluice up --redis-cluster 3` starts and forms three masters (and Kafka); a plain
    `sluice down` stops them; `up` again finds the same cluster with its data (AOF and
    nodes.conf), and the stores' client works on it."""
    settings = _with_ports(stack_settings(str(tmp_path / "state")),
                           redis_cluster_port=free_port_block(3))
    runner = CliRunner()
    key = f"test-stack:{uuid.uuid4().hex}"
    clustered = with_redis_cluster(settings, 3)
    try:
        result = runner.invoke(cli, ["up", "--redis-cluster", "3"], obj=settings)
        assert result.exit_code == 0, result.output
        assert "redis+cluster://" in result.output
        assert "SLUICE_STACK__REDIS_CLUSTER=3" in result.output
        lines = [line.split()[:2] for line in result.output.splitlines()]
        nodes = [line for line in lines if line and line[0].startswith("redis-node")]
        assert nodes == [["redis-node0", "up"], ["redis-node1", "up"], ["redis-node2", "up"]]
        ports = json.loads((settings.state_dir / "ports.json").read_text())
        assert ports["redis_cluster"] == clustered.stack.redis_cluster_ports()
        client = redis_client(clustered.redis)
        for n in range(30):  # keys on every master
            client.set(f"{key}:{n}", n)
        client.close()
        node0 = redis.Redis(port=clustered.stack.redis_cluster_port)
        assert node0.config_get("appendfsync") == {"appendfsync": "always"}
        node0.close()

        # Idempotent: nothing new is started.
        again = runner.invoke(cli, ["up", "--redis-cluster", "3"], obj=settings)
        assert "redis  already running" in again.output, again.output
        assert runner.invoke(cli, ["up", "--redis-cluster", "4"], obj=settings).exit_code == 1

        down = runner.invoke(cli, ["down"], obj=settings)  # without the flag
        assert "redis  stopped" in down.output, down.output
        assert _processes_in(settings.state_dir) == []

        assert Stack(clustered).up() == {"redis": True, "kafka": True}
        client = redis_client(clustered.redis)
        assert [client.get(f"{key}:{n}") for n in range(30)] == [
            str(n).encode() for n in range(30)]
        client.close()
    finally:
        Stack(settings).down()
    assert _processes_in(settings.state_dir) == []


@pytest.mark.integration
def test_the_compose_init_command_finds_a_formed_cluster_ok(redis_cluster: Settings) -> None:
    """`python -m sluice.redis_cluster` (docker-compose's redis-cluster-init) on masters that
    already form the cluster of ``redis.url``: nothing to do, exit 0; on a URL that is not a
    cluster's: a clear refusal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    run = [sys.executable, "-m", "sluice.redis_cluster"]
    done = subprocess.run(run, env=env | {"SLUICE_REDIS__URL": redis_cluster.redis.url},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert f"Redis Cluster ok: {redis_cluster.redis.url}" in done.stdout
    refused = subprocess.run(run, env=env | {"SLUICE_REDIS__URL": "redis://127.0.0.1:1/0"},
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1 and "not a redis+cluster:// URL" in refused.stderr
