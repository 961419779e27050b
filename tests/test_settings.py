"""Settings from the environment: each variable converted by its field's type, and a wrong
value or an unreadable annotation refused at start-up with a message naming the variable."""

from __future__ import annotations

import dataclasses
import decimal
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.processes import ROOT
from devtools.stack import read_dotenv
from shared.settings import Settings, SettingsError

REQUIRED = {"DATABASE_URL": "postgresql://app:pw@db.example/wallet", "REDIS_URL": "redis://r/0"}


@dataclasses.dataclass(frozen=True)
class WithOptional(Settings):
    drain_deadline: float | None = None
    pin: int = dataclasses.field(default=0, repr=False)


@dataclasses.dataclass(frozen=True)
class WithList(Settings):
    tags: list[str] = dataclasses.field(default_factory=list)


def from_env(**variables: str) -> Settings:
    return Settings.from_env({**REQUIRED, **variables})


def test_each_value_is_converted_by_its_fields_type() -> None:
    settings = from_env(
        SHARD_COUNT="8", REPLY_TIMEOUT="2.5", AUTH_ENABLED="yes", JWT_SECRET="s" * 32
    )
    assert settings.shard_count == 8
    assert settings.reply_timeout == 2.5
    assert settings.auth_enabled is True
    assert settings.jwt_secret == "s" * 32
    assert from_env(REPLY_TIMEOUT="3").reply_timeout == 3.0
    assert isinstance(from_env(REPLY_TIMEOUT="3").reply_timeout, float)
    assert from_env(SHARD_COUNT="").shard_count == 64  # empty counts as unset


def test_settings_read_back_from_their_environment() -> None:
    settings = from_env(SHARD_COUNT="8", BATCH_INTERVAL="0.005", REUSE_PORT="true")
    assert Settings.from_env(settings.to_env()) == settings
    optional = WithOptional.from_env({**REQUIRED, "DRAIN_DEADLINE": "1.5"})
    assert WithOptional.from_env(optional.to_env()) == optional
    assert WithOptional.from_env(WithOptional.from_env(REQUIRED).to_env()).drain_deadline is None


@pytest.mark.parametrize("raw", ["8.5", "eight", "0x10", "1e3", "-"])
def test_a_wrong_integer_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env(SHARD_COUNT=raw)
    assert str(caught.value) == f"SHARD_COUNT={raw!r}: expected an integer"


@pytest.mark.parametrize("raw", ["5s", "five", "nan", "inf", "-inf", "1,5"])
def test_a_wrong_float_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env(REPLY_TIMEOUT=raw)
    assert str(caught.value) == f"REPLY_TIMEOUT={raw!r}: expected a finite number"


@pytest.mark.parametrize("raw", ["maybe", "2", "enabled", "tru"])
def test_a_wrong_bool_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env(AUTH_ENABLED=raw)
    assert str(caught.value) == (
        f"AUTH_ENABLED={raw!r}: expected true or false (or 1/0, yes/no, on/off)"
    )


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        *[("true", True), ("TRUE", True), ("1", True), ("on", True), ("yes", True)],
        *[("false", False), ("0", False), ("Off", False), ("no", False)],
    ],
)
def test_a_bool_takes_explicit_words(raw: str, value: bool) -> None:
    assert from_env(REUSE_PORT=raw).reuse_port is value


def test_an_optional_float_given_empty_or_absent() -> None:
    assert WithOptional.from_env({**REQUIRED, "DRAIN_DEADLINE": "2.5"}).drain_deadline == 2.5
    assert WithOptional.from_env({**REQUIRED, "DRAIN_DEADLINE": ""}).drain_deadline is None
    assert WithOptional.from_env(REQUIRED).drain_deadline is None
    # Not read as text, which is what a lookup by the annotation's string made of it.
    with pytest.raises(SettingsError, match=r"^DRAIN_DEADLINE='soon': expected a finite number$"):
        WithOptional.from_env({**REQUIRED, "DRAIN_DEADLINE": "soon"})


def test_a_hidden_fields_value_stays_out_of_the_message() -> None:
    with pytest.raises(SettingsError) as caught:
        WithOptional.from_env({**REQUIRED, "PIN": "hunter2"})
    assert str(caught.value) == "PIN=(hidden): expected an integer"


def test_a_field_whose_annotation_has_no_converter_is_refused_even_unset() -> None:
    for environ in (REQUIRED, {**REQUIRED, "TAGS": "a,b"}):
        with pytest.raises(SettingsError) as caught:
            WithList.from_env(environ)
        message = str(caught.value)
        assert message.startswith("TAGS: no converter for its annotation list[str]"), message
        assert "supported: int, float, bool, str" in message


def test_missing_and_out_of_range_values_are_settings_errors() -> None:
    with pytest.raises(SettingsError, match="set DATABASE_URL in the environment"):
        Settings.from_env({"REDIS_URL": "redis://r/0"})
    with pytest.raises(SettingsError, match="SHARD_COUNT must be greater than 0"):
        from_env(SHARD_COUNT="0")
    with pytest.raises(SettingsError, match="BATCH_INTERVAL must not be negative"):
        from_env(BATCH_INTERVAL="-1")
    with pytest.raises(SettingsError, match="API_METRICS_PORT must differ from PORT"):
        from_env(PORT="9000", API_METRICS_PORT="9000")
    with pytest.raises(SettingsError, match="FORWARDED_ALLOW_IPS: 'proxy'"):
        from_env(FORWARDED_ALLOW_IPS="10.0.0.0/8, proxy")
    assert from_env(FORWARDED_ALLOW_IPS="10.0.0.1, fd00::/8,*").forwarded_allow_ips
    assert from_env(API_METRICS_PORT="0").api_metrics_port == 0


def test_the_repr_masks_secrets() -> None:
    settings = from_env(JWT_SECRET="k" * 32)
    shown = repr(settings)
    assert "pw" not in shown
    assert "app:***@db.example" in shown
    assert "k" * 32 not in shown


@pytest.mark.parametrize(
    ("command", "program"), [(["worker", "--check"], "worker"), (["api"], "api")]
)
def test_a_process_refuses_a_wrong_value_with_one_line(command: list[str], program: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        env={**REQUIRED, "SHARD_COUNT": "eight"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr == (
        f"{program}: invalid settings: SHARD_COUNT='eight': expected an integer\n"
    ), run.stderr
    assert run.stdout == ""


def test_an_unsupported_class_is_named_plainly() -> None:
    @dataclasses.dataclass(frozen=True)
    class WithDecimal(Settings):
        limit: decimal.Decimal = decimal.Decimal(1)

    with pytest.raises(SettingsError, match=r"^LIMIT: no converter for its annotation Decimal "):
        WithDecimal.from_env(REQUIRED)


def test_secrets_come_from_files_less_a_trailing_newline(tmp_path: Path) -> None:
    files = {
        "JWT_SECRET": ("j" * 32 + "\n", "j" * 32),
        "DATABASE_URL": ("postgresql://app:pw@db/wallet\r\n", "postgresql://app:pw@db/wallet"),
        "REDIS_URL": ("redis://:pw@r/0", "redis://:pw@r/0"),  # no newline at all
    }
    environ = {}
    for name, (content, _) in files.items():
        (tmp_path / name).write_text(content, newline="")
        environ[f"{name}_FILE"] = str(tmp_path / name)
    settings = Settings.from_env({**environ, "JWT_SECRET": ""})  # empty counts as unset
    read = (settings.jwt_secret, settings.database_url, settings.redis_url)
    assert read == tuple(value for _, value in files.values())
    (tmp_path / "twice").write_text("s" * 32 + "\n\n")
    kept = Settings.from_env({**REQUIRED, "JWT_SECRET_FILE": str(tmp_path / "twice")})
    assert kept.jwt_secret == "s" * 32 + "\n"  # one newline is the file's end, not two


def test_a_secret_set_twice_or_from_a_missing_or_empty_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    with pytest.raises(SettingsError, match=r"^set JWT_SECRET or JWT_SECRET_FILE, not both$"):
        from_env(JWT_SECRET="t" * 32, JWT_SECRET_FILE=str(secret))
    missing = tmp_path / "absent"
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"REDIS_URL": "redis://r/0", "DATABASE_URL_FILE": str(missing)})
    assert str(caught.value) == (
        f"DATABASE_URL_FILE={missing}: cannot read it (No such file or directory)"
    )
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match=r"REDIS_URL_FILE=.*: the file is empty"):
        from_env(REDIS_URL="", REDIS_URL_FILE=str(tmp_path / "empty"))


def test_a_process_with_a_missing_secret_file_stops_at_start_with_one_line(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "jwt"
    run = subprocess.run(
        [sys.executable, "-m", "api"],
        cwd=ROOT,
        env={**REQUIRED, "JWT_SECRET_FILE": str(missing)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr == (
        f"api: invalid settings: JWT_SECRET_FILE={missing}: cannot read it"
        " (No such file or directory)\n"
    )


def test_log_settings_are_checked() -> None:
    assert from_env().log_level == "INFO"
    assert from_env(LOG_LEVEL="debug").log_level == "debug"  # any case
    with pytest.raises(SettingsError, match="LOG_LEVEL must be one of DEBUG, INFO, WARNING"):
        from_env(LOG_LEVEL="verbose")
    assert from_env().access_log_sample == 0.0  # off
    assert from_env(ACCESS_LOG_SAMPLE="0.25").access_log_sample == 0.25
    for wrong in ("-0.1", "1.5"):
        with pytest.raises(SettingsError, match="ACCESS_LOG_SAMPLE must be from 0 to 1"):
            from_env(ACCESS_LOG_SAMPLE=wrong)


def test_make_run_reads_dotenv_without_overriding_the_environment(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(
        "# a comment\n"
        "\n"
        "PORT=8001\n"
        "export SHARD_COUNT=16\n"
        "JWT_SECRET='a # kept' \n"
        'JWT_ISSUER="quoted"\n'
        "REDIS_KEY_PREFIX=plain # a comment after it\n"
        "LOG_LEVEL=\n"
    )
    environ = {"PORT": "9000"}
    added = read_dotenv(path, environ)
    assert sorted(added) == [
        "JWT_ISSUER",
        "JWT_SECRET",
        "LOG_LEVEL",
        "REDIS_KEY_PREFIX",
        "SHARD_COUNT",
    ]
    assert environ == {
        "PORT": "9000",  # set before: kept
        "SHARD_COUNT": "16",
        "JWT_SECRET": "a # kept",
        "JWT_ISSUER": "quoted",
        "REDIS_KEY_PREFIX": "plain",
        "LOG_LEVEL": "",
    }
    assert read_dotenv(tmp_path / "absent", environ) == []
    path.write_text("NOT A SETTING\n")
    with pytest.raises(ValueError, match=r"\.env:1: not NAME=value"):
        read_dotenv(path, {})
