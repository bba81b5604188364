"""Hardware evidence: one attester per TEE, and pure parsers of quotes and reports."""
