"""loraserve on Ray Serve: N replicas of the base model behind one loraserve gRPC ingress."""
