"""The medledger anchoring service."""
