"""loraserve server: configuration, the gRPC layer (server.api) and the engine (server.engine)."""
