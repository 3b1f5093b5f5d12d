"""The embedded Redis Cluster of ``sluice up --redis-cluster N`` (``stack.redis_cluster``).

N masters from the same ``redis-server`` as the single embedded Redis, with the same
persistence (``infra/redis/redis.conf``: AOF, ``appendfsync always``) and password, each with
its own port, folder and ``nodes.conf``. They are joined and given their slots through
redis-py, with the cluster commands themselves (``CLUSTER MEET``, ``CLUSTER ADDSLOTSRANGE``),
no ``redis-cli``. A cluster once formed remembers itself in its ``nodes.conf`` files, so a
later ``sluice up`` only restarts the nodes and waits for ``cluster_state:ok``.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import redis

from sluice.config import CLUSTER_BUS_OFFSET
from sluice.errors import StackError
from sluice.processes import ComponentStatus, RedisProcess, _wait
from sluice.settings import Settings, load_settings
from streams.config import cluster_nodes

log = logging.getLogger(__name__)

#: Hash slots of every Redis Cluster.
SLOTS = 16384
NODE_PREFIX = "redis-node"


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Contiguous, inclusive slot ranges, one per master, as even as can be."""
    if masters < 1:
        raise ValueError(f"a cluster needs at least one master, not {masters}")
    bounds = [SLOTS * i // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


class RedisNodeProcess(RedisProcess):
    """Master ``index`` of the embedded cluster: the single Redis's configuration plus
    cluster mode, on ``stack.redis_cluster_port + index`` (bus: that + 10000)."""

    def __init__(self, settings: Settings, index: int) -> None:
        self.index = index
        self.name = f"{NODE_PREFIX}{index}"  # its folder, pid file and logs
        super().__init__(settings)

    @property
    def port(self) -> int:
        return self.settings.stack.redis_cluster_port + self.index

    @property
    def bus_port(self) -> int:
        """The node-to-node port (set explicitly: the tests' free ports are anywhere)."""
        return self.port + CLUSTER_BUS_OFFSET

    @property
    def port_setting(self) -> str:
        return "redis_cluster_port"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def extra_config(self) -> list[str]:
        return ["cluster-enabled yes", "cluster-config-file nodes.conf",
                f"cluster-port {self.bus_port}"]


class RedisClusterProcesses:
    """Start, form, stop and inspect the embedded cluster's masters (one state folder)."""

    def __init__(self, settings: Settings, masters: int | None = None) -> None:
        self.settings = settings
        count = settings.stack.redis_cluster if masters is None else masters
        self.nodes = [RedisNodeProcess(settings, i) for i in range(count)]

    @classmethod
    def recorded(cls, settings: Settings) -> RedisClusterProcesses:
        """The masters that have a pid file in the state folder, whatever the settings
        say now (``sluice down`` stops a cluster that ``up --redis-cluster N`` started)."""
        indexes = []
        for pid_file in settings.state_dir.glob(f"{NODE_PREFIX}*.pid"):
            suffix = pid_file.stem[len(NODE_PREFIX):]
            if suffix.isdigit():
                indexes.append(int(suffix))
        return cls(settings, max(indexes, default=-1) + 1)

    @property
    def name(self) -> str:
        return "redis"

    def start(self) -> bool:
        """Start the masters that do not run, join them and assign the slots when they are
        new, and wait until every one says ``cluster_state:ok``. Idempotent; True when a
        process was started. Leaves nothing it started running when it fails."""
        if not self.nodes:
            raise StackError("stack.redis_cluster is 0: no cluster to start")
        started: list[RedisNodeProcess] = []
        try:
            for node in self.nodes:
                if node.start():
                    started.append(node)
            self._form()
        except (StackError, redis.RedisError) as exc:
            for node in started:
                node.stop()
            if isinstance(exc, StackError):
                raise
            raise StackError(f"forming the Redis Cluster failed: {exc}") from exc
        return bool(started)

    def stop(self) -> bool:
        """Stop every master; True when any ran."""
        return any([node.stop() for node in self.nodes])

    def status(self) -> list[ComponentStatus]:
        """One line per master; a master answers when it is up and its cluster is ok."""
        out = []
        for node in self.nodes:
            st = node.status()
            if st.answering and self._state(node) != "ok":
                st = ComponentStatus(st.name, st.pid, st.running, False, st.address, st.log)
            out.append(st)
        return out

    # -- forming ---------------------------------------------------------------------------
    def _masters(self) -> Masters:
        return Masters([("127.0.0.1", n.port, n.bus_port) for n in self.nodes],
                       self.settings.redis.password, self.settings.stack.start_timeout_s,
                       where=str(self.settings.state_dir / "logs"))

    def _state(self, node: RedisNodeProcess) -> str:
        return self._masters().state(("127.0.0.1", node.port, node.bus_port))

    def _form(self) -> None:
        masters = self._masters()
        if not masters.form():
            folders = ", ".join(str(node.home) for node in self.nodes)
            raise StackError(f"the Redis Cluster under {self.settings.state_dir} was formed "
                             f"otherwise: `sluice down`, delete {folders}, and `sluice up` again")


Address = tuple[str, int, int]
"""A master: host, client port, cluster bus port."""


class Masters:
    """Joins masters into one cluster with the cluster commands, through redis-py."""

    def __init__(self, addresses: list[Address], password: str | None, timeout_s: float,
                 where: str = "the nodes' logs") -> None:
        self.addresses = addresses
        self.password = password
        self.timeout_s = timeout_s
        self.where = where

    def _client(self, address: Address) -> redis.Redis:
        return redis.Redis(host=address[0], port=address[1], password=self.password,
                           socket_timeout=10)

    def info(self, address: Address) -> dict[str, str]:
        """``CLUSTER INFO`` of one master."""
        with self._client(address) as client:
            text = client.execute_command("CLUSTER", "INFO")
        text = text.decode() if isinstance(text, bytes) else str(text)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def state(self, address: Address) -> str:
        """``cluster_state`` of one master (``unreachable`` when it does not answer)."""
        try:
            return self.info(address).get("cluster_state", "?")
        except redis.RedisError:
            return "unreachable"

    def form(self) -> bool:
        """Join and assign the slots when every master is new; then wait until every one
        says ``cluster_state:ok``. False when they are neither new nor this cluster
        already (formed with other masters, or half-formed)."""
        count = len(self.addresses)
        infos = [self.info(address) for address in self.addresses]
        assigned = [int(info.get("cluster_slots_assigned", 0)) for info in infos]
        known = [int(info.get("cluster_known_nodes", 1)) for info in infos]
        if all(a == 0 for a in assigned) and all(k == 1 for k in known):
            self._join()
        elif not (all(a == SLOTS for a in assigned) and all(k == count for k in known)):
            log.error("masters know %s nodes and have %s slots assigned; asked for %d masters",
                      known, assigned, count)
            return False
        if not _wait(lambda: all(self.state(a) == "ok" for a in self.addresses),
                     self.timeout_s):
            states = {f"{a[0]}:{a[1]}": self.state(a) for a in self.addresses}
            raise StackError(f"the Redis Cluster is not ok after {self.timeout_s:.0f} s: "
                             f"{states}; see {self.where}")
        return True

    def _join(self) -> None:
        """CLUSTER MEET every master from the first (by IP address, which MEET needs),
        then one slot range each."""
        first, *others = self.addresses
        with self._client(first) as client:
            for host, port, bus in others:
                client.execute_command("CLUSTER", "MEET", socket.gethostbyname(host), port, bus)
        count = len(self.addresses)
        if not _wait(lambda: all(int(self.info(a).get("cluster_known_nodes", 0)) == count
                                 for a in self.addresses), self.timeout_s):
            raise StackError(f"the {count} Redis Cluster masters did not meet within "
                             f"{self.timeout_s:.0f} s; see {self.where}")
        for address, (low, high) in zip(self.addresses, slot_ranges(count), strict=True):
            with self._client(address) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        log.info("formed a Redis Cluster of %d masters: %s", count, self.addresses)


def main() -> None:
    """``python -m sluice.redis_cluster``: form the cluster that ``redis.url`` names (its
    masters new, cluster-enabled, bus on port + 10000) and wait until it is ok; idempotent.
    docker-compose's one-shot ``redis-cluster-init`` service runs it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    if not settings.redis.cluster:
        raise SystemExit(f"redis.url {settings.redis.url} is not a redis+cluster:// URL")
    nodes = [(host, port, port + CLUSTER_BUS_OFFSET) for host, port in
             cluster_nodes(settings.redis.url)]
    try:
        formed = Masters(nodes, settings.redis.password, settings.stack.start_timeout_s).form()
    except (StackError, redis.RedisError, OSError) as exc:
        raise SystemExit(f"forming the Redis Cluster failed: {exc}") from exc
    if not formed:
        raise SystemExit("the masters belong to another cluster, or to a half-formed one")
    print(f"Redis Cluster ok: {settings.redis.url}")


if __name__ == "__main__":
    main()
