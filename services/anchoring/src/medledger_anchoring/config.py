"""Anchoring's settings: the common ones under MEDLEDGER_, with anchoring's default ports, the
chain and the anchoring policy."""

from pathlib import Path

from pydantic import Field, field_validator

from medledger_runtime.settings import ServiceSettings
from medledger_verifier.notes import valid_key_name


class AnchoringSettings(ServiceSettings):
    grpc_port: int = 50054
    metrics_port: int = 9104
    database_url: str = "sqlite+aiosqlite:///.medledger/anchoring.db"
    # Where the audit log answers (consistency and inclusion proofs, checkpoints).
    audit_address: str = "127.0.0.1:50055"

    # The chain: any EVM JSON-RPC endpoint with the P256VERIFY precompile (EIP-7951).
    chain_rpc_url: str = "http://127.0.0.1:8545"
    # The chain id the service expects; it refuses to send to another chain.
    chain_id: int = Field(default=31337, ge=1)
    anchor_registry_address: str = ""
    # Empty: consent commitments are not written on chain.
    consent_registry_address: str = ""
    # The anchoring account's private key (hex) in a file: a mounted secret. Vault transit has
    # no secp256k1 keys, so this is the one key that is not in the key manager.
    anchorer_key_file: Path | None = None
    # The trust policy that VerifyProof checks against (what `medledger up` writes).
    trust_policy_file: Path | None = None

    # The log whose checkpoints are anchored.
    log_origin: str = "medledger.local/audit"
    # Anchor the newest signed checkpoint this long after the last anchor ...
    anchor_interval_seconds: float = Field(default=10.0, gt=0)
    # ... or as soon as this many entries wait, whichever comes first.
    anchor_every_entries: int = Field(default=10_000, ge=1)
    # Blocks a transaction must be under before its anchor counts (1 on a chain with immediate
    # finality).
    confirmations: int = Field(default=1, ge=1, le=1000)
    # The most one transaction may pay per gas, in gwei: a guard against a fee spike.
    max_fee_per_gas_gwei: float = Field(default=500.0, gt=0)

    @field_validator("log_origin")
    @classmethod
    def _origin_is_a_note_key_name(cls, value: str) -> str:
        if not valid_key_name(value):
            raise ValueError("a log origin is non-empty, with no space or '+'")
        return value

    @field_validator("anchorer_key_file", "trust_policy_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value
