"""Public transparency ledger: Merkle log, signed checkpoints, proofs, offline verifier."""
