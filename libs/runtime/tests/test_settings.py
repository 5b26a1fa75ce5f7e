"""Settings: typed, one prefix, a bad value refused with the variable's name."""

import subprocess
import sys

import pytest

from medledger_runtime.settings import ConfigError, ServiceSettings, load_settings, read_secret_file


def test_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDLEDGER_GRPC_PORT", "6000")
    monkeypatch.setenv("MEDLEDGER_TRACE_SAMPLING_RATIO", "0.25")
    s = load_settings(ServiceSettings)
    assert s.grpc_port == 6000
    assert s.trace_sampling_ratio == 0.25
    assert s.log_level == "INFO"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MEDLEDGER_GRPC_PORT", "not-a-port"),
        ("MEDLEDGER_GRPC_PORT", "70000"),
        ("MEDLEDGER_HTTP_PORT", "70000"),
        ("MEDLEDGER_HTTP_MAX_BODY_BYTES", "10"),
        ("MEDLEDGER_TRACE_SAMPLING_RATIO", "1.5"),
        ("MEDLEDGER_LOG_LEVEL", "CHATTY"),
        ("MEDLEDGER_TLS_CERT_FILE", "/nonexistent/cert.pem"),
    ],
)
def test_bad_value_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_settings(ServiceSettings)
    assert variable in str(err.value)


@pytest.mark.parametrize("old", ["MEDLEDGER_JWKS_HTTP_PORT", "MEDLEDGER_TILES_HTTP_PORT"])
def test_a_renamed_variable_is_refused_naming_its_new_name(monkeypatch: pytest.MonkeyPatch, old: str) -> None:
    monkeypatch.setenv(old, "9111")
    with pytest.raises(ConfigError) as err:
        load_settings(ServiceSettings)
    assert f"{old} is now MEDLEDGER_HTTP_PORT" in str(err.value)
    monkeypatch.delenv(old)
    monkeypatch.setenv("MEDLEDGER_HTTP_PORT", "9115")
    assert load_settings(ServiceSettings).http_port == 9115


def test_service_refuses_to_start_with_a_bad_setting() -> None:
    env = {"MEDLEDGER_METRICS_PORT": "ninety", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "medledger_identity"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "MEDLEDGER_METRICS_PORT" in proc.stderr


def test_secret_is_read_from_a_file(tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cr3t\n")
    assert read_secret_file(secret) == b"s3cr3t"
    with pytest.raises(ConfigError, match="cannot read secret file"):
        read_secret_file(tmp_path / "missing")
