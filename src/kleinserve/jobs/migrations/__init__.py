"""The job stores' schemas as numbered SQL scripts, one folder per database (`sqlite/`, `postgres/`):
`001_jobs.sql`, `002_...sql`, applied in order, each once, and recorded in the database's `schema_version`
table (by jobs/store.py for SQLite, jobs/postgres.py for PostgreSQL). A change of schema is a new file; a
file that was released is never edited, since databases out there have run it.
"""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"(\d{3})_\w+\.sql")


def scripts(database: str) -> list[tuple[int, str]]:
    """The (version, SQL text) of `database`'s migrations ("sqlite" or "postgres"), in order: versions 1,
    2, ... with no gap (a gap is a packaging mistake: RuntimeError rather than a skipped step)."""
    found = sorted(
        (int(match[1]), entry.read_text())
        for entry in (resources.files(__name__) / database).iterdir()
        if (match := _NAME.fullmatch(entry.name))
    )
    if [version for version, _ in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"the {database} migrations are not numbered 1..{len(found)}: {found}")
    return found
