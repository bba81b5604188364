"""cva — the Confidential Volume Agent (daemon, contract, KBS client, gRPC service, CLI)."""

__version__ = "0.1.0"
