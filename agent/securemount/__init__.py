"""CDH's `SecureMount` for kata-agent: the pure request decisions (`decisions`), the backend that
opens contract and ephemeral volumes and binds them (`volumes`), its crash-safe records
(`records`) and the block-device identification from sysfs (`blockdev`).

May import the daemon core (agent.volumes, agent.mountpoints, agent.errors, agent.log,
agent._proto), the ttRPC server types (agent.rpc.ttrpc: status codes) and the storage stack
(luks); never agent.rpc's gRPC front, agent.cli or agent.kbs.
"""
