"""Generated protobuf and gRPC stubs of protos/loraserve/v1 (regenerate with scripts/gen_protos.sh)."""
