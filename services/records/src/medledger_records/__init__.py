"""The medledger records service."""
