"""The medledger audit service."""
