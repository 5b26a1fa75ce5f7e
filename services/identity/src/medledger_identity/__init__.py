"""The medledger identity service."""
