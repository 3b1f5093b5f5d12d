"""TLS and SASL work when set, for every client sluice has; Redis with a password.

One private embedded stack for the module, started by the project's own stack code with
three secured listeners beside its PLAINTEXT one (SSL; SASL_PLAINTEXT and SASL_SSL with
SASL/PLAIN), a self-signed certificate the stack makes with the JDK's ``keytool``, and a
Redis that requires a password. Each client is then pointed at each listener:
kafka-python (``sluice produce``'s producer, ``sluice tail``, the admin client, the
trainer's batch source) and Faust/aiokafka (a real ``sluice worker``).
"""

from __future__ import annotations

import re
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faust
import pytest
import redis
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from schemas.errors import SluiceError
from sluice.config import SecuredListener, StackSettings
from sluice.errors import SettingsError
from sluice.ports import free_port
from sluice.settings import Settings, load_settings
from sluice.stack import Stack
from streams.app import _credentials
from streams.config import KafkaSettings
from streams.connections import kafka_client_options, redis_client
from streams.tail import tail
from tests.agents.pipeline_util import (
    REPO_ROOT,
    OutcomeReader,
    _sluice_command,
    corpus,
    isolated,
    produce,
    raw_event,
    unique_id,
    worker_env,
)

PROTOCOLS: tuple[SecuredListener, ...] = ("SSL", "SASL_PLAINTEXT", "SASL_SSL")
USER = "sluice-client"


# --- settings, no services ---------------------------------------------------------------


def test_sasl_needs_its_credentials_and_ignored_settings_are_errors(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    with pytest.raises(ValueError,
                       match=re.escape("needs kafka.sasl_username and kafka.sasl_password")):
        KafkaSettings(security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match=re.escape("kafka.sasl_password would be ignored")):
        KafkaSettings(security_protocol="SSL", sasl_password="x")
    with pytest.raises(ValueError, match=re.escape("kafka.ssl_cafile would be ignored")):
        KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="u",
                      sasl_password="p", ssl_cafile=str(ca))
    missing = KafkaSettings(security_protocol="SSL", ssl_cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(SluiceError, match=re.escape(f"kafka.ssl_cafile {tmp_path}")):
        kafka_client_options(missing)  # read when a client is built, named when missing
    with pytest.raises(SettingsError, match="kafka"):  # through the entry point, named
        load_settings(state_dir=str(tmp_path), kafka={"security_protocol": "SASL_SSL"})
    # Passwords never show in a printed settings object.
    shown = repr(KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="u",
                               sasl_password="hunter2-secret"))
    assert "hunter2-secret" not in shown


def test_faust_credentials_carry_tls_whenever_the_protocol_says_ssl(tmp_path: Path) -> None:
    """SASL_SSL used to build ``SASLCredentials`` without a context: Faust then picks
    SASL_PLAINTEXT and sends the password in cleartext."""
    assert _credentials(KafkaSettings()) is None
    tls = _credentials(KafkaSettings(security_protocol="SSL"))
    assert isinstance(tls, faust.SSLCredentials)
    assert tls.context.verify_mode == ssl.CERT_REQUIRED and tls.context.check_hostname
    sasl = dict(sasl_username="u", sasl_password="p")
    plain = _credentials(KafkaSettings(security_protocol="SASL_PLAINTEXT", **sasl))
    assert isinstance(plain, faust.SASLCredentials)
    assert plain.protocol.value == "SASL_PLAINTEXT" and plain.mechanism.value == "PLAIN"
    secured = _credentials(KafkaSettings(security_protocol="SASL_SSL", **sasl,
                                         sasl_mechanism="SCRAM-SHA-512"))
    assert isinstance(secured, faust.SASLCredentials)
    assert secured.protocol.value == "SASL_SSL" and secured.ssl_context is not None
    assert secured.mechanism.value == "SCRAM-SHA-512"


def test_kafka_python_gets_the_same_tls_and_sasl() -> None:
    options = kafka_client_options(KafkaSettings(
        bootstrap_servers="b:9094", security_protocol="SASL_SSL", sasl_username="u",
        sasl_password="p"))
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "PLAIN"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("u", "p")
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert "ssl_context" not in kafka_client_options(KafkaSettings(bootstrap_servers="b:9092"))


def test_stack_listener_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=re.escape("needs stack.kafka_sasl_users")):
        StackSettings(kafka_listeners={"SASL_SSL": 9500})
    with pytest.raises(ValueError, match="both port 9092"):
        StackSettings(kafka_listeners={"SSL": 9092})
    with pytest.raises(ValueError, match="without quotes"):
        StackSettings(kafka_listeners={"SASL_PLAINTEXT": 9500},
                      kafka_sasl_users={"a": 'pa"ss'})
    with pytest.raises(ValueError, match=re.escape("needs stack.kafka_keystore_password")):
        StackSettings(kafka_keystore=Path("/x.p12"))


# --- the secured embedded stack --------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a live embedded stack with secured listeners and a Redis password (the
    settings' own Kafka address is its loopback PLAINTEXT listener)."""
    if shutil.which("keytool") is None:
        pytest.skip("the JDK's keytool is needed to make the test certificate")
    state = tmp_path_factory.mktemp("secured-stack")
    settings = load_settings(
        state_dir=str(state),
        stack={"kafka_port": free_port(), "controller_port": free_port(),
               "redis_port": free_port(),
               "kafka_listeners": {name: free_port() for name in PROTOCOLS},
               "kafka_sasl_users": {USER: secrets.token_urlsafe(16),
                                    "someone-else": secrets.token_urlsafe(16)}},
        redis={"password": secrets.token_urlsafe(16)},
    )
    embedded = Stack(settings)
    embedded.up()
    try:
        yield settings
    finally:
        embedded.down()


def client_settings(stack: Settings, protocol: SecuredListener, **kafka: Any) -> Settings:
    """``stack`` as a client of its ``protocol`` listener, trusting the stack's certificate
    (validated, as a settings file or SLUICE_* variables would be)."""
    values: dict[str, Any] = {
        "bootstrap_servers": f"127.0.0.1:{stack.stack.kafka_listeners[protocol]}",
        "security_protocol": protocol, "connect_timeout_ms": 5000}
    if protocol.startswith("SASL"):
        values.update(sasl_mechanism="PLAIN", sasl_username=USER,
                      sasl_password=stack.stack.kafka_sasl_users[USER])
    if protocol.endswith("SSL"):
        values["ssl_cafile"] = str(Stack(stack).kafka.tls_folder / "ca.pem")
    values.update(kafka)
    return stack.model_copy(update={"kafka": KafkaSettings(**values)})


@pytest.mark.integration
def test_the_stack_made_a_certificate_and_private_configs(secured: Settings) -> None:
    kafka = Stack(secured).kafka
    assert (kafka.tls_folder / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    for private in (kafka.config_file, Stack(secured).redis.config_file,
                    kafka.tls_folder / "broker.p12", kafka.tls_folder / "keystore.password"):
        assert private.stat().st_mode & 0o077 == 0, private
    # The passwords are in no process's command line.
    password = secured.redis.password
    assert password
    for component in Stack(secured).status():
        assert component.running and component.answering
        cmdline = Path(f"/proc/{component.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline


@pytest.mark.integration
def test_redis_requires_the_password(secured: Settings) -> None:
    without = redis_client(secured.redis.model_copy(update={"password": None}))
    try:
        with pytest.raises(redis.AuthenticationError):
            without.ping()
    finally:
        without.close()
    wrong = redis_client(secured.redis.model_copy(update={"password": "wrong"}))
    try:
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
    finally:
        wrong.close()
    with redis_client(secured.redis) as client:
        assert client.ping()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_produce_tail_and_admin_over(secured: Settings, protocol: SecuredListener) -> None:
    settings = isolated(client_settings(secured, protocol), partitions=2)  # admin: topics
    events = [raw_event(f"{protocol}-{unique_id()}", snippet.text) for snippet in corpus(4)]
    produce(settings, events)
    seen = list(tail(settings.kafka, settings.topics, settings.topics.raw, count=None,
                     from_beginning=True, follow=False))
    assert sorted(entry["id"] for entry in seen) == sorted(e["id"] for e in events)


@pytest.mark.integration
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_trainer_source_over(secured: Settings, protocol: SecuredListener) -> None:
    from tests.streams.kafka_io import create_topic
    from tests.trainer.trainer_data import batch_samples, make_batches, stdlib_functions
    from tests.trainer.trainer_data import produce as produce_batches
    from trainer.source import KafkaBatchSource

    settings = client_settings(secured, protocol)
    topic = create_topic(settings, "secured-batches", partitions=2)
    settings = settings.model_copy(update={
        "topics": settings.topics.model_copy(update={"batches": topic})})
    samples = batch_samples(list(stdlib_functions(scale=0.02)), content_chars=100)
    batches = make_batches(samples, 4, 2, partitions=2)
    produce_batches(settings, topic, batches)
    source = KafkaBatchSource(settings, group_id=f"trainer-{unique_id()}", idle_timeout_s=3.0)
    assert sorted(item.batch["batch_id"] for item in source) == sorted(
        b["batch_id"] for b in batches)


@pytest.mark.integration
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_worker_over(secured: Settings, protocol: SecuredListener, tmp_path: Path) -> None:
    """A real ``sluice worker`` (Faust on aiokafka) ingests over the secured listener and
    keeps its exact-dedup claims in the password-protected Redis."""
    settings = isolated(client_settings(secured, protocol), partitions=2,
                        dedup={"enabled": False}).model_copy(
        update={"state_dir": tmp_path / "worker"})
    settings.state_dir.mkdir(parents=True)
    texts = [snippet.text for snippet in corpus(3)]
    events = [raw_event(f"w-{unique_id()}", text) for text in [*texts, texts[0]]]
    log_path = tmp_path / "worker.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*_sluice_command(), "worker", "--agents", "ingest", "--loglevel", "info",
             "--web-port", str(free_port())],
            env=worker_env(settings), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    try:
        produce(settings, events)
        with OutcomeReader(settings, roles=("candidates", "rejected")) as reader:
            outcomes = reader.wait_for([e["id"] for e in events], timeout_s=90,
                                       roles=("candidates", "rejected"),
                                       alive=lambda: proc.poll() is None)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    logs = log_path.read_text(errors="replace")[-4000:]
    assert len(outcomes) == len(events), logs
    decisions = {i: [s.reason or s.role for s in seen] for i, seen in outcomes.items()}
    # The first and the last event are one text: whichever came first was claimed in Redis.
    pair = sorted(decisions[e["id"]][0] for e in (events[0], events[-1]))
    assert pair == ["candidates", "exact_duplicate"], decisions
    assert all(decisions[e["id"]] == ["candidates"] for e in events[1:-1]), decisions


@pytest.mark.integration
@pytest.mark.parametrize(("what", "protocol", "change"), [
    ("a wrong password", "SASL_SSL", {"sasl_password": "wrong"}),
    ("a user it does not know", "SASL_PLAINTEXT", {"sasl_username": "nobody"}),
    ("a certificate signed by no CA it trusts", "SSL", {"ssl_cafile": None}),
    ("cleartext on the TLS listener", "SASL_SSL",
     {"security_protocol": "SASL_PLAINTEXT", "ssl_cafile": None}),
])
def test_the_broker_refuses(secured: Settings, what: str, protocol: SecuredListener,
                            change: dict[str, Any]) -> None:
    settings = client_settings(secured, protocol, **change)
    with pytest.raises(KafkaError):
        KafkaAdminClient(**kafka_client_options(settings.kafka)).close()
