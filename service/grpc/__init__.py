"""The Open Inference Protocol (KServe V2) over gRPC: `inference.GRPCInferenceService`, beside HTTP in every worker."""
