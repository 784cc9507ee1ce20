"""The gRPC layer: protobuf <-> domain objects, authentication, status codes. Thin by design."""
