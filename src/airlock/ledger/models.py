"""Tables of the ledger package: pending events, the Merkle log, checkpoints and commitments."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from airlock.db import Base, utcnow

# A 64-bit integer key everywhere a log index lives (10^6 entries and far beyond).
BigKey = BigInteger().with_variant(Integer, "sqlite")


class LedgerPending(Base):
    """An event recorded in a service transaction, not yet integrated into the Merkle log."""

    __tablename__ = "ledger_pending"

    seq: Mapped[int] = mapped_column(BigKey, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    # The exact canonical JSON that becomes the leaf: fixed at record time so integration only hashes.
    entry: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerEntry(Base):
    """One integrated log entry: its index, canonical JSON and RFC 9162 leaf hash."""

    __tablename__ = "ledger_entries"

    idx: Mapped[int] = mapped_column(BigKey, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    kind: Mapped[str] = mapped_column(String(40), index=True)
    entry: Mapped[str] = mapped_column(Text)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    integrated_at: Mapped[datetime] = mapped_column(default=utcnow)


NODE_LEVEL_SHIFT = 56


def node_key(level: int, idx: int) -> int:
    """Return the single-integer key of node ``(level, idx)``: ``level << 56 | idx``."""
    return level << NODE_LEVEL_SHIFT | idx


class LedgerNode(Base):
    """The hash of a complete, aligned subtree (level >= 1): leaves ``[idx * 2**level, (idx + 1) * 2**level)``.

    One integer key rather than a composite one: a proof then reads all its nodes with a single
    ``key IN (...)`` on the primary key, which every database answers from the index.
    """

    __tablename__ = "ledger_nodes"

    key: Mapped[int] = mapped_column(BigKey, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))

    @property
    def level(self) -> int:
        """Height of the subtree (leaves are level 0 and live in ``ledger_entries``)."""
        return self.key >> NODE_LEVEL_SHIFT

    @property
    def idx(self) -> int:
        """Position of the subtree among those of its level."""
        return self.key & ((1 << NODE_LEVEL_SHIFT) - 1)


class LedgerState(Base):
    """The single sequencer row (id 1): tree size and root; writers lock it before integrating."""

    __tablename__ = "ledger_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    # Highest audit_events.id covered by an audit.digest event (digests cover contiguous id ranges).
    audit_last_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerCheckpoint(Base):
    """A signed tree head in the C2SP signed-note format."""

    __tablename__ = "ledger_checkpoints"

    id: Mapped[int] = mapped_column(BigKey, primary_key=True, autoincrement=True)
    size: Mapped[int] = mapped_column(BigInteger, index=True)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerCommitment(Base):
    """The private opening of a confidential field: salt and value behind a published commitment."""

    __tablename__ = "ledger_commitments"

    event_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    field: Mapped[str] = mapped_column(String(100), primary_key=True)
    salt: Mapped[str] = mapped_column(String(64))
    # Canonical JSON of the value, exactly the bytes that were committed to.
    value: Mapped[str] = mapped_column(Text)
    commitment: Mapped[str] = mapped_column(String(64))
    revealed_at: Mapped[datetime | None] = mapped_column(nullable=True)
