"""docker-compose.yml: the services of DESIGN.md, wired so that `docker compose up` works.

Static checks (no Docker here): images, KRaft, persistence, health checks, a scalable
worker, named volumes, one env file whose settings are valid, only real sluice commands, and
locked down by default (loopback ports, required passwords). Where Debian's
``docker-compose`` (1.29) is installed, it reads and interpolates the file too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from sluice.cli import cli
from sluice.redis_cluster import main as redis_cluster_main
from sluice.settings import load_settings
from streams.config import cluster_nodes

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = ("kafka", "redis", "worker", "trainer", "prometheus", "grafana")
SLUICE_SERVICES = ("worker", "trainer")
#: The secrets compose must refuse to start without (``${VAR:?message}``).
SECRETS = {"REDIS_PASSWORD": "test-redis-secret", "GRAFANA_ADMIN_PASSWORD": "test-admin-secret"}
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset or empty: compose stops there."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?message}``, ``${VAR?message}``)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return value or ""

    return _VARIABLE.sub(one, text)


def interpolated(value: Any, env: dict[str, str]) -> Any:
    """``value`` (a loaded compose tree) with every string interpolated."""
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [interpolated(item, env) for item in value]
    if isinstance(value, dict):
        return {key: interpolated(item, env) for key, item in value.items()}
    return value


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
    env.update({k: interpolate(v, SECRETS) for k, v in _environment(service).items()})
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
    if name == "worker":  # the one that uses Redis logs in with the required password
        assert settings.redis.password == SECRETS["REDIS_PASSWORD"]


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


# --- locked down by default -------------------------------------------------------------


def _host_ip(port: Any) -> str | None:
    """The host address a ``ports`` entry binds (None: every interface)."""
    if isinstance(port, dict):
        return port.get("host_ip")
    parts = str(port).rsplit(":", 2)
    return parts[0].strip("[]") if len(parts) == 3 else None


def test_every_published_port_listens_on_loopback_by_default(
        services: dict[str, dict[str, Any]]) -> None:
    published = {}
    for name, service in interpolated(services, SECRETS).items():
        for port in service.get("ports", []):
            published[f"{name} {port}"] = _host_ip(port)
    assert published, "nothing is published at all"
    assert all(ip == "127.0.0.1" for ip in published.values()), published


def test_no_service_starts_without_its_password(services: dict[str, dict[str, Any]]) -> None:
    for secret in SECRETS:
        without = {k: v for k, v in SECRETS.items() if k != secret}
        with pytest.raises(MissingVariable, match=secret):
            interpolated(services, without)
        with pytest.raises(MissingVariable, match=secret):  # empty is not a password either
            interpolated(services, {**without, secret: ""})


def test_redis_requires_the_password_and_its_clients_send_it(
        services: dict[str, dict[str, Any]]) -> None:
    resolved = interpolated(services, SECRETS)
    words = _words(resolved["redis"]["command"])
    assert words[words.index("--requirepass") + 1] == SECRETS["REDIS_PASSWORD"]
    # The health check logs in (redis-cli reads REDISCLI_AUTH) and needs a real PONG.
    assert _environment(resolved["redis"])["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]
    assert "PONG" in " ".join(_words(resolved["redis"]["healthcheck"]["test"]))
    assert (_environment(resolved["worker"])["SLUICE_REDIS__PASSWORD"]
            == SECRETS["REDIS_PASSWORD"])


def test_grafana_has_an_admin_password_and_no_anonymous_access(
        services: dict[str, dict[str, Any]]) -> None:
    env = _environment(interpolated(services, SECRETS)["grafana"])
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED", "false").lower() == "false"


COMPOSE_1 = shutil.which("docker-compose")


@pytest.mark.skipif(COMPOSE_1 is None, reason="Debian's docker-compose is not installed")
def test_docker_compose_reads_it_and_refuses_to_run_without_the_secrets(
        tmp_path: Path) -> None:
    assert COMPOSE_1 is not None
    empty = tmp_path / "empty.env"  # never a developer's own .env
    empty.write_text("")
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}

    def config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([COMPOSE_1, "-f", str(COMPOSE), "--env-file", str(empty),
                               "config"], env=base | env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)

    refused = config({})
    assert refused.returncode != 0
    assert "REDIS_PASSWORD" in refused.stderr or "GRAFANA_ADMIN_PASSWORD" in refused.stderr
    done = config(SECRETS)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    ports = {name: [_host_ip(p) for p in s.get("ports", [])] for name, s in resolved.items()}
    assert all(ip == "127.0.0.1" for ips in ports.values() for ip in ips), ports
    assert {"kafka", "redis", "prometheus", "grafana"} <= {n for n, ips in ports.items() if ips}


CLUSTER_NODES = ("redis-node0", "redis-node1", "redis-node2")


def test_the_cluster_profile_runs_three_persistent_locked_down_masters(
        services: dict[str, dict[str, Any]]) -> None:
    resolved = interpolated(services, SECRETS)
    for name in CLUSTER_NODES:
        node = resolved[name]
        assert node["profiles"] == ["cluster"]
        assert node["image"].startswith("redis:8")
        words = _words(node["command"])
        for flag, value in (("--cluster-enabled", "yes"), ("--appendonly", "yes"),
                            ("--appendfsync", "always"),
                            ("--requirepass", SECRETS["REDIS_PASSWORD"])):
            assert words[words.index(flag) + 1] == value, (name, flag)
        assert _environment(node)["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]
        assert [str(v).split(":", 1)[0] for v in node["volumes"]] == [f"{name}-data"]
        assert [_host_ip(p) for p in node["ports"]] == ["127.0.0.1"]
    # The default profile is untouched: one Redis, workers that use it.
    assert "profiles" not in services["redis"] and "profiles" not in services["worker"]


@pytest.mark.parametrize("name", ["redis-cluster-init", "worker-cluster"])
def test_the_cluster_profile_forms_the_cluster_and_its_workers_use_it(
        services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    service = services[name]
    assert service["profiles"] == ["cluster"]
    env = _read_env_file(ROOT / _env_files(service)[0])
    env.update({k: interpolate(v, SECRETS) for k, v in _environment(service).items()})
    for key in list(os.environ):
        if key.startswith("SLUICE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.redis.cluster
    assert settings.redis.password == SECRETS["REDIS_PASSWORD"]
    assert cluster_nodes(settings.redis.url) == [(n, 6379) for n in CLUSTER_NODES]
    depends = service["depends_on"]
    if name == "redis-cluster-init":
        assert _words(service["command"]) == ["python", "-m", "sluice.redis_cluster"]
        assert callable(redis_cluster_main)
        assert all(depends[n]["condition"] == "service_healthy" for n in CLUSTER_NODES)
    else:
        assert _words(service["command"])[:2] == ["sluice", "worker"]
        assert depends["redis-cluster-init"]["condition"] == "service_completed_successfully"
        assert "redis" not in depends
