"""Identity's domain rules, free of I/O: FHIR checks, identifiers, did:key, who may do what,
and the shape of access tokens."""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import base58
from fhir.resources.R4B.organization import Organization
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.practitioner import Practitioner
from joserfc import jwk
from medledger.types.v1 import vocabulary_pb2
from pydantic import ValidationError

from medledger_runtime.auth import Caller
from medledger_runtime.errors import FieldViolation, InvalidArgument, PermissionDenied
from medledger_runtime.events import SERVICES, STATELESS_COMPONENTS
from medledger_runtime.fhir_json import check_strings
from medledger_runtime.vocabulary import KIND_NAMES, PRINCIPAL_ID_PREFIX, ROLE_NAMES
from medledger_sdk.identity_link import TOKEN_ISSUER

PrincipalKind = vocabulary_pb2.PrincipalKind
Role = vocabulary_pb2.Role

ISSUER = TOKEN_ISSUER
# The FHIR gateway (a stateless component, no gRPC API of its own) is an audience too.
AUDIENCES = frozenset(f"medledger.{name}" for name in (*SERVICES, *STATELESS_COMPONENTS))
FHIR_AUDIENCE = "medledger.fhir"
# A token for the FHIR gateway is sent on by it, unchanged, to the services it calls: those
# accept it too (the caller's own token, so each service decides and logs as for a gRPC call).
FHIR_TOKEN_AUDIENCES = (
    FHIR_AUDIENCE,
    "medledger.identity",
    "medledger.consent",
    "medledger.records",
    "medledger.audit",
)
# RFC 8725 suggests short-lived tokens; deactivation also reaches every service within a second.
TOKEN_TTL_SECONDS = 15 * 60
# SMART Backend Services recommends five minutes for client_credentials tokens.
CLIENT_TOKEN_TTL_SECONDS = 5 * 60
MAX_FHIR_BYTES = 64 * 1024

# Kinds RegisterPrincipal makes; a SMART client only through RegisterSmartClient (with its JWKS).
_REGISTERED_KINDS = frozenset(PRINCIPAL_ID_PREFIX) - {PrincipalKind.PRINCIPAL_KIND_SMART_CLIENT}
# Kinds that carry a FHIR resource, and which one.
_FHIR_MODEL: dict[int, type[Patient] | type[Practitioner] | type[Organization]] = {
    PrincipalKind.PRINCIPAL_KIND_PATIENT: Patient,
    PrincipalKind.PRINCIPAL_KIND_PRACTITIONER: Practitioner,
    PrincipalKind.PRINCIPAL_KIND_ORGANIZATION: Organization,
}
# Kinds whose resource may be left out: an organization registered before identity kept one, or
# by an admin who knows it by its id alone, is still an organization.
_RESOURCE_OPTIONAL = frozenset({PrincipalKind.PRINCIPAL_KIND_ORGANIZATION})
# Kinds a SMART client may register (an integration engine loading a hospital's directory and
# patients), each as its token's scopes allow (`c` of the kind's FHIR type).
CLIENT_REGISTERED_KINDS = frozenset(
    {
        PrincipalKind.PRINCIPAL_KIND_PATIENT,
        PrincipalKind.PRINCIPAL_KIND_PRACTITIONER,
        PrincipalKind.PRINCIPAL_KIND_ORGANIZATION,
    }
)
# FHIR's required binding for Patient.gender and Practitioner.gender; fhir.resources checks
# types and cardinality but not bindings.
ADMINISTRATIVE_GENDER = frozenset({"male", "female", "other", "unknown"})
# Multicodec prefix of an Ed25519 public key (varint 0xed), as did:key wants it.
_ED25519_PUB_MULTICODEC = b"\xed\x01"


def new_principal_id(kind: int) -> str:
    return f"{PRINCIPAL_ID_PREFIX[kind]}_{uuid.uuid4().hex}"


def new_client_secret() -> str:
    # 256 bits from the OS; the prefix lets secret scanners recognise a leaked one.
    return "mlsec_" + secrets.token_urlsafe(32)


def did_key(ed25519_public_key: bytes) -> str:
    """did:key of an Ed25519 public key (W3C did:key method, multibase base58btc)."""
    if len(ed25519_public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return "did:key:z" + base58.b58encode(_ED25519_PUB_MULTICODEC + ed25519_public_key).decode("ascii")


def check_kind(kind: int) -> None:
    if kind not in _REGISTERED_KINDS:
        raise InvalidArgument.field("kind", "must be one of patient, practitioner, organization, researcher, service")


def check_organization(kind: int, organization_id: str) -> None:
    """A practitioner belongs to an organization; other kinds belong to none."""
    if kind == PrincipalKind.PRINCIPAL_KIND_PRACTITIONER and not organization_id:
        raise InvalidArgument.field("organization_id", "required for a practitioner")
    if kind != PrincipalKind.PRINCIPAL_KIND_PRACTITIONER and organization_id:
        raise InvalidArgument.field("organization_id", "only practitioners belong to an organization")


@dataclass(frozen=True)
class FhirResource:
    """A validated FHIR resource: its canonical JSON and its identifiers (system, value)."""

    json: bytes
    identifiers: tuple[tuple[str, str], ...]


def validate_fhir(kind: int, raw: bytes, field: str, *, required: bool = False) -> FhirResource | None:
    """Validate `raw` as the FHIR R4 resource a principal of `kind` carries.

    Patients and practitioners need one, organizations may have one; a resource has at least
    one identifier with a system and a value (the duplicate check and FindPrincipals use them);
    other kinds take none (`required`: an organization's too, when it is replaced). Errors name
    the FHIR path, never the offending value: it may be personal data.
    """
    model = _FHIR_MODEL.get(kind)
    if model is None:
        if raw:
            raise InvalidArgument.field(field, "only patients, practitioners and organizations carry a FHIR resource")
        return None
    if not raw and kind in _RESOURCE_OPTIONAL and not required:
        return None
    if not raw:
        raise InvalidArgument.field(field, f"required: a FHIR R4 {model.__name__} resource, JSON")
    if len(raw) > MAX_FHIR_BYTES:
        raise InvalidArgument.field(field, f"larger than {MAX_FHIR_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument.field(field, "not JSON") from None
    if not isinstance(document, dict) or document.get("resourceType") != model.__name__:
        raise InvalidArgument.field(f"{field}.resourceType", f"must be {model.__name__}")
    try:
        resource = model.model_validate(document)
    except ValidationError as exc:
        violations = tuple(
            FieldViolation(
                ".".join([field, *(str(p) for p in err["loc"] if p != "__root__")]),
                # pydantic's message without the input value, which could be personal data.
                err["msg"],
            )
            for err in exc.errors(include_input=False, include_url=False)[:20]
        )
        raise InvalidArgument(f"{field}: not a valid FHIR R4 {model.__name__}", violations=violations) from None
    check_strings(document, field)
    gender = getattr(resource, "gender", None)
    if gender is not None and gender not in ADMINISTRATIVE_GENDER:
        raise InvalidArgument.field(f"{field}.gender", "must be one of " + ", ".join(sorted(ADMINISTRATIVE_GENDER)))
    identifiers = tuple((str(i.system), str(i.value)) for i in (resource.identifier or []) if i.system and i.value)
    if not identifiers:
        raise InvalidArgument.field(f"{field}.identifier", "at least one identifier with a system and a value")
    return FhirResource(resource.model_dump_json(exclude_none=True).encode(), identifiers)


def identifier_index_input(system: str, value: str) -> bytes:
    """What the blind index hashes: FHIR's ``system|value`` token form."""
    return f"{system}|{value}".encode()


# -- who may do what (beyond the coarse per-RPC table the interceptor applies) -----------------


def is_admin(caller: Caller) -> bool:
    return caller.has_role("admin")


def is_smart_client(caller: Caller) -> bool:
    return caller.kind == "smart-client"


def check_may_register(caller: Caller, kind: int, organization_id: str) -> None:
    """Admins register any kind; org-admins register practitioners of their own organization;
    SMART clients patients, practitioners and organizations (their token's scopes decide which;
    a practitioner's organization: ``check_may_staff``)."""
    if is_admin(caller):
        return
    if (
        caller.has_role("org-admin")
        and kind == PrincipalKind.PRINCIPAL_KIND_PRACTITIONER
        and organization_id
        and organization_id == caller.organization_id
    ):
        return
    if is_smart_client(caller) and kind in CLIENT_REGISTERED_KINDS:
        return
    raise PermissionDenied(
        "only admins, org-admins for practitioners of their organization, or SMART clients for patients, "
        "practitioners and organizations may register this"
    )


def check_may_staff(caller: Caller, organization_id: str, organization_registered_by: str) -> None:
    """A SMART client registers practitioners of its own organization or of an organization it
    registered itself (the bundles it loads name the organizations their practitioners work
    for): another organization's staff is its org-admins' to register."""
    if not is_smart_client(caller):
        return
    if organization_id == caller.organization_id or organization_registered_by == caller.principal_id:
        return
    raise PermissionDenied(
        "a SMART client registers practitioners of its own organization or of organizations it registered"
    )


def issues_secret(caller: Caller) -> bool:
    """Whether a registration by `caller` makes the principal a client secret (returned to the
    caller). Not by a SMART client: a system loading a directory must not be able to act as the
    patients and practitioners it registers (a patient's secret grants consent)."""
    return not is_smart_client(caller)


def check_may_change_role(caller: Caller, role: int, target_organization_id: str) -> None:
    """Admins grant any role; org-admins grant roles other than admin within their organization."""
    if role not in ROLE_NAMES:
        raise InvalidArgument.field("role", "must be one of " + ", ".join(ROLE_NAMES.values()))
    if is_admin(caller):
        return
    if (
        caller.has_role("org-admin")
        and role != Role.ROLE_ADMIN
        and target_organization_id
        and target_organization_id == caller.organization_id
    ):
        return
    raise PermissionDenied("only admins, or org-admins within their organization, may change this role")


def may_read_resource(caller: Caller, principal_id: str, organization_id: str) -> bool:
    """A FHIR resource is shown to its principal, to admins, and to its organization's org-admins."""
    if caller.principal_id == principal_id or is_admin(caller):
        return True
    return caller.has_role("org-admin") and bool(organization_id) and organization_id == caller.organization_id


def check_may_manage(caller: Caller, principal_id: str, organization_id: str) -> None:
    """Updating or deactivating: the principal itself, admins, org-admins of its organization."""
    if not may_read_resource(caller, principal_id, organization_id):
        raise PermissionDenied("only the principal, admins or its org-admins may change it")


# -- access tokens --------------------------------------------------------------------------------


def check_audience(audience: str) -> None:
    if audience not in AUDIENCES:
        raise InvalidArgument.field("audience", "must be one of " + ", ".join(sorted(AUDIENCES)))


def token_audience(audience: str) -> str | list[str]:
    """The ``aud`` claim: the service asked for; for the FHIR gateway, it and the services it
    calls with the same token."""
    return list(FHIR_TOKEN_AUDIENCES) if audience == FHIR_AUDIENCE else audience


def scope_context(kind: int) -> str:
    """The SMART context a principal's scoped tokens are in: a patient's own data (patient/), a
    SMART client's system access (system/), anyone else's as a user (user/)."""
    if kind == PrincipalKind.PRINCIPAL_KIND_PATIENT:
        return "patient"
    if kind == PrincipalKind.PRINCIPAL_KIND_SMART_CLIENT:
        return "system"
    return "user"


def token_claims(
    *,
    principal_id: str,
    kind: int,
    roles: Iterable[int],
    organization_id: str,
    audience: str,
    now: int,
    scope: str = "",
    ttl_seconds: int = TOKEN_TTL_SECONDS,
) -> dict[str, Any]:
    """RFC 7519 claims of a medledger access token, plus kind, roles and organization; a scoped
    token also carries ``scope`` (SMART v2, space-separated) and, for a patient, ``patient``
    (SMART's patient in context: the patient themself)."""
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": token_audience(audience),
        "sub": principal_id,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "kind": KIND_NAMES[kind],
        "roles": sorted(ROLE_NAMES[r] for r in roles if r in ROLE_NAMES),
        "org": organization_id,
    }
    if scope:
        claims["scope"] = scope
        if kind == PrincipalKind.PRINCIPAL_KIND_PATIENT:
            claims["patient"] = principal_id
    return claims


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jws_signing_input(header: Mapping[str, Any], claims: Mapping[str, Any]) -> bytes:
    """The JWS signing input (RFC 7515 §5.1): BASE64URL(header) '.' BASE64URL(payload).

    Built here rather than by PyJWT because the private key never leaves the key manager:
    PyJWT signs only with key material it holds.
    """
    compact = (",", ":")
    return (
        _b64url(json.dumps(dict(header), separators=compact).encode())
        + "."
        + _b64url(json.dumps(dict(claims), separators=compact).encode())
    ).encode("ascii")


def jws_compact(signing_input: bytes, signature: bytes) -> str:
    return signing_input.decode("ascii") + "." + _b64url(signature)


def signing_kid(key_name: str, version: int) -> str:
    """The ``kid`` of one version of the token-signing key."""
    return f"{key_name}.v{version}"


# -- SMART Backend Services clients -----------------------------------------------------------------

# What a client may sign its assertions with (SMART: token_endpoint_auth_signing_alg_values_supported).
CLIENT_ASSERTION_ALGORITHMS = ("ES384", "RS384")
MAX_CLIENT_KEYS = 5
MAX_JWKS_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
# JWK members that only a private or symmetric key has (RFC 7518 §6.2.2, §6.3.2, §6.4).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_KEY_ALG = {"EC": "ES384", "RSA": "RS384"}


def check_may_register_client(caller: Caller, organization_id: str) -> None:
    """Admins register a client for any organization; org-admins for their own."""
    if is_admin(caller):
        return
    if caller.has_role("org-admin") and organization_id and organization_id == caller.organization_id:
        return
    raise PermissionDenied("only admins, or org-admins for their organization, may register a SMART client")


def _b64url_length(value: object) -> int:
    """The byte length of a base64url member; 0 when it is not one."""
    if not isinstance(value, str) or not value:
        return 0
    try:
        return len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except ValueError:
        return 0


def validate_client_jwks(raw: str, field: str = "jwks_json") -> str:
    """A SMART client's JWKS: public ES384 (EC P-384) or RS384 (RSA ≥ 2048 bits) signing keys,
    each with a distinct ``kid``, at most MAX_CLIENT_KEYS; its canonical JSON.

    A private member anywhere refuses the whole set: identity keeps no client secret."""
    if not raw or len(raw.encode()) > MAX_JWKS_BYTES:
        raise InvalidArgument.field(field, f"required: a JWKS of at most {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(raw)
    except ValueError:
        raise InvalidArgument.field(field, "not JSON") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_CLIENT_KEYS:
        raise InvalidArgument.field(f"{field}.keys", f"a list of 1 to {MAX_CLIENT_KEYS} keys")
    kids: set[str] = set()
    public: list[dict[str, Any]] = []
    for i, key in enumerate(keys):
        where = f"{field}.keys[{i}]"
        if not isinstance(key, dict):
            raise InvalidArgument.field(where, "a JWK object")
        if _PRIVATE_MEMBERS & key.keys():
            raise InvalidArgument.field(where, "a private or symmetric key; register public keys only")
        kid = key.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= 128 or kid in kids:
            raise InvalidArgument.field(f"{where}.kid", "required, at most 128 characters, distinct within the set")
        kids.add(kid)
        kty = key.get("kty")
        if kty not in _KEY_ALG:
            raise InvalidArgument.field(f"{where}.kty", "must be EC (ES384) or RSA (RS384)")
        if key.get("alg", _KEY_ALG[kty]) != _KEY_ALG[kty]:
            raise InvalidArgument.field(f"{where}.alg", f"must be {_KEY_ALG[kty]} for kty {kty}")
        if key.get("use", "sig") != "sig" or not set(key.get("key_ops", ["verify"])) <= {"verify"}:
            raise InvalidArgument.field(where, "must be a signature-verification key")
        if kty == "EC" and key.get("crv") != "P-384":
            raise InvalidArgument.field(f"{where}.crv", "must be P-384 for ES384")
        if kty == "RSA" and _b64url_length(key.get("n")) * 8 < MIN_RSA_BITS:
            raise InvalidArgument.field(f"{where}.n", f"an RSA key of at least {MIN_RSA_BITS} bits")
        try:
            imported = jwk.import_key(key)
        except Exception:  # joserfc raises ValueError and its own errors for a malformed key
            raise InvalidArgument.field(where, f"not a valid {kty} public key") from None
        if imported.is_private:
            raise InvalidArgument.field(where, "a private key; register public keys only")
        public.append({**imported.as_dict(private=False), "kid": kid, "alg": _KEY_ALG[kty], "use": "sig"})
    return json.dumps({"keys": public}, separators=(",", ":"), sort_keys=True)


# -- finding principals by identifier -----------------------------------------------------------------


def parse_identifier(identifier: str, field: str = "identifier") -> tuple[str, str]:
    """FHIR's token form ``system|value`` (both required) as (system, value)."""
    system, bar, value = identifier.partition("|")
    if not bar or not system or not value or len(identifier) > 1024:
        raise InvalidArgument.field(field, "must be system|value, both non-empty")
    return system, value


def check_may_find(caller: Caller, kind: int) -> None:
    """Practitioners and organizations are found by admins, org-admins, practitioners and SMART
    clients (a FHIR bundle names its authors and their organizations); patients only by admins
    and SMART clients (an organization's system importing its patients' data): anyone else could
    test whether a person is a patient."""
    if kind in (PrincipalKind.PRINCIPAL_KIND_PRACTITIONER, PrincipalKind.PRINCIPAL_KIND_ORGANIZATION):
        if is_admin(caller) or caller.has_role("org-admin") or caller.kind in ("practitioner", "smart-client"):
            return
    elif kind == PrincipalKind.PRINCIPAL_KIND_PATIENT:
        if is_admin(caller) or caller.kind == "smart-client":
            return
    else:
        # Only patients, practitioners and organizations carry a FHIR resource, hence identifiers.
        raise InvalidArgument.field(
            "kind", "must be patient, practitioner or organization: only they carry FHIR identifiers"
        )
    raise PermissionDenied("this caller may not look this kind of principal up by identifier")
