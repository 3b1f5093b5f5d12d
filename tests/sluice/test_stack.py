"""The embedded stack on a private state folder: idempotent up, clean down, durable Redis.

One private stack for the whole module (a JVM start costs ~10 s); the shared session
``stack`` is never stopped here.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from kafka import KafkaProducer

from sluice.cli import cli
from sluice.errors import StackError
from sluice.settings import Settings, load_settings
from sluice.stack import Stack
from streams.connections import kafka_client_options
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
