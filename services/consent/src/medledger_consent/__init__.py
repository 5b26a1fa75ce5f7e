"""The medledger consent service."""
