"""Child process for the crash test: append events in batches and sequence them until killed.

After each committed batch it prints the batch's event ids as one JSON line, so the parent knows
exactly which events were committed before the SIGKILL.
"""

from __future__ import annotations

import json
import sys

from airlock.db import Database
from airlock.ledger import service


def main(url: str, worker: str) -> None:
    """Append 400 events per transaction; integrate in batches of 300 between them; forever."""
    db = Database(url)
    n = 0
    while True:
        with db.session() as session:
            ids = service.record_events(session, [("crash.test", {"w": worker, "n": n + i}, None) for i in range(400)])
        n += 400
        print(json.dumps(ids), flush=True)
        service.sequence(db, batch_size=300)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
