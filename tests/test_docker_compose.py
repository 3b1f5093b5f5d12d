"""docker-compose.yml: the services of DESIGN.md, wired so that `docker compose up` works.

Static checks (no Docker here): images, KRaft, persistence, health checks, a scalable
worker, named volumes, one env file whose settings are valid, and only real sluice commands.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from sluice.cli import cli
from sluice.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = ("kafka", "redis", "worker", "trainer", "prometheus", "grafana")
SLUICE_SERVICES = ("worker", "trainer")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<: *anchor) resolved
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _env_files(service: dict[str, Any]) -> list[str]:
    files = service.get("env_file") or []
    if isinstance(files, (str, dict)):
        files = [files]
    return [f["path"] if isinstance(f, dict) else f for f in files]


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    return values


def _words(command: Any) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(word) for word in command]


def _command_lines(service: dict[str, Any]) -> list[list[str]]:
    """Every command line a service runs: entrypoint + command, and its health check."""
    lines = [_words(service.get("entrypoint")) + _words(service.get("command"))]
    test = (service.get("healthcheck") or {}).get("test")
    if test:
        words = _words(test)
        if words and words[0] in ("CMD", "CMD-SHELL"):
            words = shlex.split(" ".join(words[1:])) if words[0] == "CMD-SHELL" else words[1:]
        lines.append(words)
    return lines


def _sluice_commands(line: list[str]) -> list[str]:
    """The subcommands after each `sluice` (options before it, like --config x, skipped)."""
    found = []
    for i, word in enumerate(line):
        if Path(word).name == "sluice":
            rest = line[i + 1:]
            while rest and rest[0].startswith("-"):
                takes_value = rest[0] in ("--config",) and "=" not in rest[0]
                rest = rest[2:] if takes_value else rest[1:]
            if rest:
                found.append(rest[0])
    return found


def test_the_services_of_the_design(services: dict[str, dict[str, Any]]) -> None:
    assert set(SERVICES) <= set(services)


def test_kafka_is_a_kraft_broker_with_a_health_check(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    image = kafka["image"]
    assert image.startswith("apache/kafka:4."), image
    env = _environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].replace(" ", "").split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]  # reachable by service name
    assert env.get("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR") == "1"  # one node
    assert "zookeeper" not in str(kafka).lower()
    assert kafka["healthcheck"]["test"]


def test_redis_8_persists_with_aof(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:8"), redis["image"]
    words = _words(redis.get("command"))
    assert "--appendonly" in words and words[words.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"]
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", []))


@pytest.mark.parametrize("name", ["kafka", "redis"])
def test_infrastructure_data_live_in_named_volumes(compose: dict[str, Any],
                                                   services: dict[str, dict[str, Any]],
                                                   name: str) -> None:
    named = set(compose.get("volumes") or {})
    sources = [str(v).split(":", 1)[0] for v in services[name].get("volumes", [])]
    assert any(source in named for source in sources), (name, sources)


def test_every_named_volume_is_declared_and_every_bind_mount_exists(
        compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    named = set(compose.get("volumes") or {})
    assert named
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} is missing"
            else:
                assert source in named, f"{name}: volume {source} is not declared"


def test_the_worker_scales(services: dict[str, dict[str, Any]]) -> None:
    """`docker compose up --scale worker=N` needs no fixed container name or host port."""
    worker = services["worker"]
    assert "container_name" not in worker
    for port in worker.get("ports", []):
        if isinstance(port, dict):
            assert "published" not in port, port
        else:
            assert ":" not in str(port), f"worker publishes a fixed host port: {port}"
    assert {"kafka", "redis"} <= set(worker.get("depends_on") or {})


def test_one_env_file_for_every_sluice_service(services: dict[str, dict[str, Any]]) -> None:
    files = {f for service in services.values() for f in _env_files(service)}
    assert len(files) == 1, files
    (env_file,) = files
    assert (ROOT / env_file).is_file()
    for name in SLUICE_SERVICES:
        assert _env_files(services[name]) == [env_file], name


@pytest.mark.parametrize("name", SLUICE_SERVICES)
def test_sluice_services_have_valid_settings_pointing_at_the_containers(
        services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    service = services[name]
    env: dict[str, str] = {}
    for env_file in _env_files(service):
        env.update(_read_env_file(ROOT / env_file))
    env.update(_environment(service))
    for key in list(os.environ):
        if key.startswith("SLUICE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    settings = load_settings()  # every SLUICE_* value is a valid setting, or this raises
    assert settings.bootstrap_servers.split(",")[0].split(":")[0] == "kafka"
    assert settings.redis_url.startswith("redis://redis:")
    assert not settings.embedded


def _run(services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    return {name: [cmd for line in _command_lines(s) for cmd in _sluice_commands(line)]
            for name, s in services.items()}


def test_worker_and_trainer_run_sluice(services: dict[str, dict[str, Any]]) -> None:
    run = _run(services)
    assert run["worker"] == ["worker"]
    assert run["trainer"] == ["train"]


def test_every_sluice_command_run_exists(services: dict[str, dict[str, Any]]) -> None:
    run = _run(services)
    unknown = {(name, cmd) for name, cmds in run.items() for cmd in cmds
               if cmd not in cli.list_commands(click.Context(cli))}
    assert not unknown, f"commands not in sluice.cli: {sorted(unknown)}"


def test_monitoring_images(services: dict[str, dict[str, Any]]) -> None:
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
