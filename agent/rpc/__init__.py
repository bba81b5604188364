"""The daemon's fronts: the gRPC service (`grpc_service`) and its AF_VSOCK splice (`vsock`),
the ttRPC server (`ttrpc`) and its services (`ttrpc_service`), the VolumeAgent handlers both
fronts share (`volume_agent`), and the gRPC client the CLI uses (`client`).

May import the daemon core (agent.volumes, agent.policy, agent.errors, agent.log, agent._proto)
and agent.securemount (the ttRPC front registers its service); the gRPC and ttRPC fronts do not
import each other except through `volume_agent` (and `ttrpc_service` reuses the gRPC status
mapping, `grpc_service.status_for`, so both answer with the same codes). Never imports agent.cli
or agent.kbs.
"""
