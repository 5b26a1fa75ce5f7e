"""Configuration errors and secret files, shared by the SDK's client and the services' runtime."""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the environment variable."""


def read_secret_file(path: Path) -> bytes:
    """Read a secret from a mounted file, without trailing newline. Never log the result."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    return data.rstrip(b"\r\n")
