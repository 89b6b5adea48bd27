"""The frameworks a fingerprint drives, one adapter module each, imported only when loop=NAME chooses it."""
