"""cva as a front for the Confidential Data Hub on kata-agent's CDH socket.

kata-agent dials one ttRPC socket for everything CDH does (SPEC e.9): image pull, sealed
secrets, resources, SecureMount. cva serves block-device SecureMount (and its own VolumeAgent)
there itself and forwards every other call, byte for byte, to the real CDH listening on another
socket (`[cdh] upstream` in the image config): `route` decides (pure), `upstream` makes the
forwarded call, `front` installs both on the ttRPC server as its relay.

May import the ttRPC server (agent.rpc.ttrpc), the CDH protos (agent._proto), agent.errors,
agent.log and agent.securemount.decisions (the SecureMount method name); never the gRPC front,
the daemon, agent.cli or agent.kbs.
"""
