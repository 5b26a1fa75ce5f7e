"""How ``up`` configures each service: the environment of its process (ports, database, Kafka,
its peers' addresses, where its keys are, and for anchoring the chain side); and the FHIR
gateway's, which has none of a database, Kafka or keys."""

from __future__ import annotations

from medledger_devstack import contracts, openbao
from medledger_devstack.cli.state import StateDir
from medledger_devstack.stack.layout import GATEWAYS, HOST, SERVICES, Ports


def service_environment(
    name: str,
    *,
    state: StateDir,
    ports: Ports,
    origin: str,
    database_url: str | None,
    key_server: openbao.OpenBao | None,
    deployment: contracts.Deployment | None,
) -> dict[str, str]:
    """The MEDLEDGER_* settings of service `name` (added to this process's own environment).

    `database_url` is a template with {service}, or None for the state folder's SQLite files;
    `key_server` is None when the services keep their keys in local keyring files."""
    env = {
        "MEDLEDGER_GRPC_PORT": str(ports.grpc(name)),
        "MEDLEDGER_METRICS_PORT": str(ports.metrics(name)),
        "MEDLEDGER_DATABASE_URL": (
            database_url.replace("{service}", name) if database_url else state.database_url(name)
        ),
        "MEDLEDGER_KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:{ports.kafka}",
        "MEDLEDGER_IDENTITY_ADDRESS": f"{HOST}:{ports.grpc('identity')}",
        "MEDLEDGER_CONSENT_ADDRESS": f"{HOST}:{ports.grpc('consent')}",  # records asks it
        **key_manager_environment(name, state, key_server),
        "PYTHONUNBUFFERED": "1",  # so `tail -f` on the log shows lines as they happen
    }
    if name == "identity":
        # Every service's and gateway's secret file exists before identity reads the folder.
        for other in (*SERVICES[1:], *GATEWAYS):
            state.service_secret_file(other)
        env["MEDLEDGER_SERVICE_SECRETS_DIR"] = str(state.service_secrets_dir())
        env["MEDLEDGER_BOOTSTRAP_ADMIN_SECRET_FILE"] = str(state.admin_secret_file())
        env["MEDLEDGER_HTTP_PORT"] = str(ports.jwks)
    else:
        env["MEDLEDGER_CLIENT_SECRET_FILE"] = str(state.service_secret_file(name))
    if name == "audit":
        env["MEDLEDGER_HTTP_PORT"] = str(ports.tiles)
        env["MEDLEDGER_LAST_CHECKPOINT_FILE"] = str(state.path / "audit" / "last-checkpoint")
        env["MEDLEDGER_LOG_ORIGIN"] = origin
    if name == "anchoring":
        assert deployment is not None, "anchoring starts after the contracts are deployed"
        env["MEDLEDGER_AUDIT_ADDRESS"] = f"{HOST}:{ports.grpc('audit')}"
        env["MEDLEDGER_LOG_ORIGIN"] = origin
        env["MEDLEDGER_CHAIN_RPC_URL"] = f"http://{HOST}:{ports.anvil}"
        env["MEDLEDGER_CHAIN_ID"] = str(deployment.chain_id)
        env["MEDLEDGER_ANCHOR_REGISTRY_ADDRESS"] = deployment.anchor_registry
        env["MEDLEDGER_CONSENT_REGISTRY_ADDRESS"] = deployment.consent_registry
        env["MEDLEDGER_ANCHORER_KEY_FILE"] = str(state.anchorer_key_file())
        env["MEDLEDGER_TRUST_POLICY_FILE"] = str(state.trust_policy_file)
    return env


def gateway_environment(name: str, *, state: StateDir, ports: Ports) -> dict[str, str]:
    """The MEDLEDGER_* settings of the FHIR gateway: its ports, the four services it calls with the
    caller's token, its own client secret, and identity's token endpoint for SMART clients."""
    assert name in GATEWAYS, name
    return {
        "MEDLEDGER_GRPC_PORT": str(ports.grpc(name)),
        "MEDLEDGER_METRICS_PORT": str(ports.metrics(name)),
        "MEDLEDGER_HTTP_PORT": str(ports.fhir),
        "MEDLEDGER_IDENTITY_ADDRESS": f"{HOST}:{ports.grpc('identity')}",
        "MEDLEDGER_CONSENT_ADDRESS": f"{HOST}:{ports.grpc('consent')}",
        "MEDLEDGER_RECORDS_ADDRESS": f"{HOST}:{ports.grpc('records')}",
        "MEDLEDGER_AUDIT_ADDRESS": f"{HOST}:{ports.grpc('audit')}",
        "MEDLEDGER_CLIENT_SECRET_FILE": str(state.service_secret_file(name)),
        # identity serves its token endpoint on its HTTP port, beside the JWKS.
        "MEDLEDGER_TOKEN_ENDPOINT_URL": f"http://{HOST}:{ports.jwks}/oauth2/token",
        "PYTHONUNBUFFERED": "1",
    }


def key_manager_environment(name: str, state: StateDir, key_server: openbao.OpenBao | None) -> dict[str, str]:
    """How a service reaches its keys: OpenBao with its own policy's token(s), else its keyring."""
    if key_server is None:
        return {
            "MEDLEDGER_MASTER_KEY_FILE": str(state.master_key_file(name)),
            "MEDLEDGER_KEYRING_FILE": str(state.keyring_file(name)),
        }
    everyday = key_server.token_file(name)
    if not everyday.exists():
        return {}  # a service without keys (anchoring): no token, no key manager
    env = {
        "MEDLEDGER_KEY_MANAGER": "vault",
        "MEDLEDGER_VAULT_ADDR": key_server.address,
        "MEDLEDGER_VAULT_TOKEN_FILE": str(everyday),
    }
    erasure = key_server.token_file(f"{name}-erasure")
    if erasure.exists():
        env["MEDLEDGER_ERASURE_VAULT_TOKEN_FILE"] = str(erasure)
    return env
