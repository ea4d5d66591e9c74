"""The whole schema: every package's tables on one ``Base.metadata``, and every section of grant terms.

It sits above every package on purpose: the kernel's ``db`` module defines ``Base`` and knows no
table, and each package's ``models`` module imports ``Base`` from below.
"""

from __future__ import annotations

from sqlalchemy import MetaData

import airlock.access.acceptance
import airlock.access.models
import airlock.access.sealing
import airlock.console.models
import airlock.contamination.models
import airlock.evals.models
import airlock.finetune.models
import airlock.governance.models
import airlock.interp.models
import airlock.jobs.models
import airlock.ledger.models
import airlock.publish.models
import airlock.redteam.models
import airlock.registry.models  # noqa: F401  (imported for their tables)
from airlock.access import quotas, retention, terms
from airlock.db import Base
from airlock.evals.terms import PublicationTerms
from airlock.finetune.terms import FinetuneTerms
from airlock.interp.terms import InterpTerms
from airlock.redteam.terms import RedteamTerms

__all__ = ["TERMS", "metadata"]

metadata: MetaData = Base.metadata
"""Every Airlock table."""

TERMS: tuple[type[terms.Terms], ...] = (
    quotas.SamplingTerms,
    FinetuneTerms,
    InterpTerms,
    PublicationTerms,
    RedteamTerms,
    retention.RetentionTerms,
)
"""The built-in sections of grant terms (each registers itself on import; others come by entry point)."""
