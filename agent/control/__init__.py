"""cva's local control socket (`<state_dir>/control.sock`): root-only requests from inside the
guest that are not part of the host-facing API and so not subject to the contract's `[api]
allow` list. Today one request, `status` (`cva status`): the pure report model and its JSON and
table forms (`report`), what the daemon knows gathered into one report (`collect`), the socket
server (`server`) and the CLI's client (`client`).

May import the daemon core (agent.volumes, agent.measure, agent.config, agent.log), the
SecureMount records' types and luks; never the host-facing fronts (agent.rpc's gRPC, vsock and
ttRPC services), agent.kbs or agent.cli (checked by lint-imports).
"""
