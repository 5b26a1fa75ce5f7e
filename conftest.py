"""Fixtures shared by every test folder: the real broker, EVM node and PostgreSQL."""

pytest_plugins = ["medledger_common.testing"]
