"""The shell's own settings section: the embedded local stack started by ``sluice up``."""

from __future__ import annotations

from pydantic import Field

from streams.config import Section


class StackSettings(Section):
    """The embedded local stack started by ``sluice up``."""

    kafka_port: int = Field(9092, ge=1, le=65535)
    controller_port: int = Field(9093, ge=1, le=65535)
    redis_port: int = Field(6379, ge=1, le=65535)
    kafka_heap: str = "768m"
    java: str = "java"
    maven: str = "mvn"
    start_timeout_s: float = Field(90.0, gt=0)
    stop_timeout_s: float = Field(20.0, gt=0)
