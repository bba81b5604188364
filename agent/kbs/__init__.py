"""The Trustee KBS client: RCAR attestation and resource fetch (`client`), the KBS wire format
(`wire`), the JWE that wraps a resource (`jwe`) and the KBS refusal types (`errors`).

Owns everything that speaks to the KBS. May import the daemon core (agent.errors, agent.log,
agent.contract), evidence (the attester that answers the challenge) and luks.secret (the key
buffer); never the fronts (agent.rpc, agent.securemount, agent.cli). Imported lazily, at the
first key fetch, never before READY=1.
"""
