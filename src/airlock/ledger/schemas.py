"""Wire schemas of the public ledger API (hashes base64, as in C2SP checkpoints)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LedgerModel(BaseModel):
    """Base of every ledger response."""


class EntryPublic(LedgerModel):
    """One integrated entry exactly as hashed into the log."""

    index: int = Field(description="Position in the log (0-based).")
    leaf_hash: str = Field(description="Base64 SHA-256(0x00 || entry).")
    entry: str = Field(description="The canonical JSON text of the entry; hash its UTF-8 bytes.")


class EntriesPublic(LedgerModel):
    """A page of entries ``[start, end)``."""

    tree_size: int = Field(description="Integrated entries at the time of the request.")
    start: int
    end: int
    entries: list[EntryPublic]


class InclusionProofPublic(LedgerModel):
    """RFC 9162 inclusion proof of one entry in the tree of ``size`` entries."""

    index: int
    size: int
    leaf_hash: str = Field(description="Base64 leaf hash of the entry.")
    proof: list[str] = Field(description="Base64 node hashes, leaf side first.")
    root: str = Field(description="Base64 root hash of the tree of ``size`` entries.")


class ConsistencyProofPublic(LedgerModel):
    """RFC 9162 consistency proof between two tree sizes."""

    old: int
    new: int
    old_root: str = Field(description="Base64 root at size ``old``.")
    new_root: str = Field(description="Base64 root at size ``new``.")
    proof: list[str] = Field(description="Base64 node hashes.")


class CheckpointPublic(LedgerModel):
    """A signed checkpoint as published by the admin API."""

    size: int
    root: str = Field(description="Base64 root hash.")
    note: str = Field(description="The C2SP signed note.")
