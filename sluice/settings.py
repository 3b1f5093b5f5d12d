"""The composed settings: every part's section, read once at the entry point.

Read by ``load_settings`` from, in rising priority: the defaults of each section, one TOML
file (``--config``, ``SLUICE_CONFIG`` or ``./sluice.toml``), and ``SLUICE_*`` environment
variables (nested with ``__``: ``SLUICE_DEDUP__THRESHOLD=0.98``). Each section lives beside
the code it configures (``streams.config``, ``agents.config``, ``trainer.config``,
``sluice.config``); each part receives only its own sections. ``settings_env`` is the one
conversion back to variables, for the processes sluice starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agents.config import (
    BalanceSettings,
    DecontaminateSettings,
    DedupSettings,
    FuzzySettings,
    IngestSettings,
)
from sluice.config import StackSettings
from sluice.errors import SettingsError
from streams.config import (
    KafkaSettings,
    MetricsSettings,
    ProduceSettings,
    RedisSettings,
    TopicSettings,
)
from trainer.config import TrainerSettings


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    return dict(value) if isinstance(value, dict) else {}


class Settings(BaseSettings):
    """Everything, validated; build it with ``load_settings``.

    Where Kafka, Redis or the checkpoint folder are left empty, the embedded stack's
    loopback addresses and ``<state_dir>/checkpoints`` are filled in here, so every part
    receives a section it can use as it is.
    """

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    state_dir: Path = Path(".sluice")
    app_id: str = "sluice"
    """Faust app id: the workers' consumer group and the prefix of their changelog topics."""
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    stack: StackSettings = StackSettings()
    topics: TopicSettings = TopicSettings()
    produce: ProduceSettings = ProduceSettings()
    ingest: IngestSettings = IngestSettings()
    fuzzy: FuzzySettings = FuzzySettings()
    dedup: DedupSettings = DedupSettings()
    balance: BalanceSettings = BalanceSettings()
    decontaminate: DecontaminateSettings = DecontaminateSettings()
    trainer: TrainerSettings = TrainerSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="before")
    @classmethod
    def _fill_embedded(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        state_dir = Path(data.get("state_dir") or ".sluice").expanduser().absolute()
        data["state_dir"] = state_dir
        try:
            stack = StackSettings(**_section(data, "stack"))
        except ValidationError:
            return data  # the field's own validation names the bad setting
        kafka = _section(data, "kafka")
        if not kafka.get("bootstrap_servers"):
            kafka["bootstrap_servers"] = _embedded_kafka(stack)
        data["kafka"] = kafka
        redis = _section(data, "redis")
        if not redis.get("url"):
            redis["url"] = _embedded_redis(stack)
        data["redis"] = redis
        trainer = _section(data, "trainer")
        if not trainer.get("checkpoint_dir"):
            trainer["checkpoint_dir"] = state_dir / "checkpoints"
        data["trainer"] = trainer
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Priority: keyword overrides, then SLUICE_* variables, then the TOML file (the
        # file is named by ``load_settings`` through ``model_config["toml_file"]``).
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def bootstrap_servers(self) -> str:
        """The Kafka bootstrap list in effect."""
        return self.kafka.bootstrap_servers

    @property
    def redis_url(self) -> str:
        """The Redis URL in effect."""
        return self.redis.url

    @property
    def embedded(self) -> bool:
        """True when Kafka and Redis are the embedded stack's (``sluice up``)."""
        return (self.kafka.bootstrap_servers == _embedded_kafka(self.stack)
                and self.redis.url == _embedded_redis(self.stack))


def _embedded_kafka(stack: StackSettings) -> str:
    return f"127.0.0.1:{stack.kafka_port}"


def _embedded_redis(stack: StackSettings) -> str:
    return stack.redis_url()


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"])
        lines.append(f"setting '{where}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Read and validate the settings; raise ``SettingsError`` naming the bad setting.

    ``config`` is a TOML file; without it ``SLUICE_CONFIG`` or ``./sluice.toml`` is used if
    present. ``overrides`` are keyword values above everything else (used by tests).
    """
    path = config or os.environ.get("SLUICE_CONFIG")
    if path is None and Path("sluice.toml").is_file():
        path = "sluice.toml"
    if path is not None and not Path(path).is_file():
        raise SettingsError(f"config file {path} does not exist")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _FromFile(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from exc


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict | tuple):
        # pydantic-settings parses complex values as JSON (a list of paths: as strings)
        return json.dumps(value, default=str)
    return str(value)


def _diff(value: Any, default: Any, path: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _diff(getattr(value, name), getattr(default, name, None), (*path, name))
    elif value != default:
        if value is None:
            raise SettingsError(f"setting {'.'.join(path)}=None cannot be passed to a "
                                "child process as a variable")
        yield "SLUICE_" + "__".join(p.upper() for p in path), _env_text(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """``SLUICE_*`` variables that make a ``sluice`` process load exactly ``settings``:
    every setting that differs from its declared default (nested with ``__``), plus the
    state folder and the stack's ports. The demo, the tests and the benchmarks start their
    workers and trainers with it."""
    defaults = Settings.model_construct()  # the declared defaults: no environment, no TOML
    env = dict(_diff(settings, defaults, ()))
    env["SLUICE_STATE_DIR"] = str(settings.state_dir)
    env["SLUICE_STACK__KAFKA_PORT"] = str(settings.stack.kafka_port)
    env["SLUICE_STACK__CONTROLLER_PORT"] = str(settings.stack.controller_port)
    env["SLUICE_STACK__REDIS_PORT"] = str(settings.stack.redis_port)
    return env
