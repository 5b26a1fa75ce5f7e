"""The gRPC API of anchoring: medledger.anchoring.v1.AnchoringService.

Its RPCs are built by the anchoring issue; until then they answer UNIMPLEMENTED, which is what the
generated base servicer does.
"""

from __future__ import annotations

from medledger.anchoring.v1 import anchoring_service_pb2_grpc as pb_grpc

from medledger_common.auth import Access
from medledger_common.service import ServiceRuntime

_SERVICE = "/medledger.anchoring.v1.AnchoringService/"
# Transparency data (anchored checkpoints) is public: anyone may verify the anchors.
PUBLIC_METHODS: tuple[str, ...] = (_SERVICE + "ListAnchoredCheckpoints",)
# The coarse table; keep it equal to services/anchoring/README.md (a test compares them).
ACCESS: dict[str, Access] = {}


class AnchoringApi(pb_grpc.AnchoringServiceServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.rt = runtime
