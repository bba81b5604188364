"""The guest prestart hook (`cva hook prestart`) and its daemon side (SPEC §e.7).

Stock Kata has one in-guest point before a container's process runs: the guest prestart hooks
that kata-agent runs from the image's hook folder. `agent.hook.prestart` is that hook process
(light: no gRPC, no storage code); `agent.hook.server` is the daemon's end of the private hook
socket; `agent.hook.state` and `agent.hook.wire` are the pure parsers between them.
"""
