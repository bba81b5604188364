"""A loopback Trustee KBS (test peer) and the fixtures around it."""
