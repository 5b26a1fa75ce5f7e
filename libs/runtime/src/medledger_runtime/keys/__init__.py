"""Key management for medledger: one interface, two implementations with the same behaviour.

- :class:`KeyManager` (in :mod:`.base`): the async interface, its types and its errors;
- :class:`LocalKeyring` (in :mod:`.local`): an encrypted keyring file, the embedded default;
- :class:`VaultKeyManager` (in :mod:`.vault`): HashiCorp Vault's transit engine through hvac.

See ``libs/runtime/KEYS.md`` for key types, the key-name scheme, the keyring format and how to run
the contract tests against a real Vault.
"""

from medledger_runtime.keys.base import (
    DATA_KEY_BYTES,
    HMAC_KEY_BYTES,
    DataKey,
    KeyInfo,
    KeyManager,
    KeyType,
    Marshaling,
    PublicKey,
    PublicKeySet,
    Signature,
)
from medledger_runtime.keys.local import LocalKeyring, create_master_key_file
from medledger_runtime.keys.names import (
    LEGACY_PATIENT_KEY_PREFIX,
    PATIENT_KEY_PREFIXES,
    PatientKeyOwner,
    audit_subject_key_name,
    legacy_patient_key_name,
    patient_key_name,
    validate_key_name,
)
from medledger_runtime.keys.shredder import KeyShredder, legacy_twin
from medledger_runtime.keys.vault import VaultKeyManager
from medledger_runtime.keys.wire import (
    der_to_raw_rs,
    raw_rs_to_der,
)

__all__ = [
    "DATA_KEY_BYTES",
    "HMAC_KEY_BYTES",
    "LEGACY_PATIENT_KEY_PREFIX",
    "PATIENT_KEY_PREFIXES",
    "DataKey",
    "KeyInfo",
    "KeyManager",
    "KeyShredder",
    "KeyType",
    "LocalKeyring",
    "Marshaling",
    "PatientKeyOwner",
    "PublicKey",
    "PublicKeySet",
    "Signature",
    "VaultKeyManager",
    "audit_subject_key_name",
    "create_master_key_file",
    "der_to_raw_rs",
    "legacy_patient_key_name",
    "legacy_twin",
    "patient_key_name",
    "raw_rs_to_der",
    "validate_key_name",
]
