"""Public transparency ledger: Merkle log, signed checkpoints, proofs, offline verifier.

This package root stays free of database and server imports so the offline verifier
(``airlock-verify``) runs with the bundle alone. Services record events with
:func:`airlock.ledger.service.record_event`.
"""

from airlock.ledger._cosig import WitnessVerifier
from airlock.ledger._entry import commitment_of
from airlock.ledger._merkle import ProofError, leaf_hash, node_hash, verify_consistency, verify_inclusion
from airlock.ledger._note import Checkpoint, NoteError, Verifier, verify_checkpoint
from airlock.ledger.verify import Report, access_table, verify_bundle

__all__ = [
    "Checkpoint",
    "NoteError",
    "ProofError",
    "Report",
    "Verifier",
    "WitnessVerifier",
    "access_table",
    "cli",
    "commitment_of",
    "cosign",
    "leaf_hash",
    "model_report",
    "models",
    "node_hash",
    "reporting",
    "routes",
    "service",
    "verify_bundle",
    "verify_checkpoint",
    "verify_consistency",
    "verify_inclusion",
    "witness",
]
