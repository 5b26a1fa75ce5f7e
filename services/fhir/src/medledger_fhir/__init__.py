"""The medledger FHIR R4 gateway: FHIR REST and SMART configuration over the services' gRPC APIs, stateless."""
