"""Settings: defaults < TOML file < SLUICE_* variables < keywords; errors name the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from agents.config import DedupSettings
from schemas.errors import SluiceError
from sluice.errors import SettingsError
from sluice.settings import Settings, load_settings

TOML = """
state_dir = "state"

[dedup]
threshold = 0.95
batch_size = 8

[balance]
policy = "power"
tau = 0.3

[topics]
partitions = 8
raw = "raw-from-file"
"""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No SLUICE_* variable from the outside, and a working folder without sluice.toml."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = load_settings()
    assert s.dedup == DedupSettings()
    assert s.dedup.threshold == 0.97
    assert s.topics.raw == "raw-events"
    assert s.state_dir == tmp_path / ".sluice"  # relative paths are made absolute
    assert s.embedded
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.redis_url == "redis://127.0.0.1:6379/0"


def test_file_then_env_then_overrides(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "custom.toml"
    config.write_text(TOML)
    clean_env.setenv("SLUICE_DEDUP__THRESHOLD", "0.98")
    clean_env.setenv("SLUICE_BALANCE__POLICY", "effective_number")
    clean_env.setenv("SLUICE_KAFKA__BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    s = load_settings(config, balance={"policy": "natural"})
    assert s.dedup.threshold == 0.98            # env over file
    assert s.dedup.batch_size == 8              # file, where env says nothing
    assert s.balance.policy == "natural"        # keyword over env
    assert s.balance.tau == 0.3                 # file, in a section that env also touches
    assert s.topics.partitions == 8 and s.topics.raw == "raw-from-file"
    assert s.topics.samples == "sluice.samples"  # default beside file values
    assert s.state_dir == tmp_path / "state"
    assert s.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert not s.embedded


def test_config_file_from_sluice_config_and_from_the_working_folder(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.toml").write_text("[dedup]\nthreshold = 0.91\n")
    (tmp_path / "sluice.toml").write_text("[dedup]\nthreshold = 0.92\n")
    assert load_settings().dedup.threshold == 0.92
    clean_env.setenv("SLUICE_CONFIG", str(tmp_path / "elsewhere.toml"))
    assert load_settings().dedup.threshold == 0.91


@pytest.mark.parametrize(("toml", "env", "setting"), [
    ("", {"SLUICE_DEDUP__THRESHOLD": "1.5"}, "dedup.threshold"),
    ("", {"SLUICE_DEDUP__THRESHOLD": "high"}, "dedup.threshold"),
    ("[dedup]\nthreshold = 0\n", {}, "dedup.threshold"),
    ('[balance]\npolicy = "random"\n', {}, "balance.policy"),
    ("", {"SLUICE_TOPICS__PARTITIONS": "0"}, "topics.partitions"),
    ("[stack]\nredis_port = 70000\n", {}, "stack.redis_port"),
    ("[dedup]\nthreshhold = 0.9\n", {}, "dedup.threshhold"),  # a typo is not ignored
    ("[ingest.code]\nmin_alnum_fraction = 2\n", {}, "ingest.code.min_alnum_fraction"),
])
def test_invalid_value_names_the_setting(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                         toml: str, env: dict[str, str], setting: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    assert f"'{setting}'" in str(caught.value)
    assert isinstance(caught.value, SluiceError)
    assert isinstance(caught.value.__cause__, ValidationError)


def test_missing_config_file_is_a_settings_error(clean_env: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"nope\.toml"):
        load_settings(tmp_path / "nope.toml")


def test_settings_are_frozen(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.dedup.threshold = 0.5  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.state_dir = Path("/elsewhere")  # type: ignore[misc]
    assert isinstance(s, Settings)


def test_redis_url_and_broker_override_the_embedded_stack(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings(redis={"url": "redis://cache:6380/2"})
    assert s.redis_url == "redis://cache:6380/2"
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert not s.embedded
    ports = load_settings(stack={"kafka_port": 19092, "redis_port": 16379})
    assert ports.bootstrap_servers == "127.0.0.1:19092"
    assert ports.redis_url == "redis://127.0.0.1:16379/0"


def test_the_readmes_settings_file_loads_as_it_is_documented(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The README's annotated settings file is what a user copies: it must load, and every
    value it shows must be the default (it documents the defaults)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "sluice.toml"
    config.write_text(block)
    s = load_settings(config)
    assert s.dedup == DedupSettings()
    assert s.dedup.backend == "torch" and s.dedup.kinds == ["CODE", "TEXT"]
