"""`kleinserve usage`: the succeeded jobs' metering (`JobUsage`, jobs/record.py) summed per key, as a table.

Imports nothing heavy (no torch), so the command answers at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from kleinserve.jobs.store import Job

USAGE_COLUMNS = (  # (JobUsage field, column title) of `kleinserve usage`; "jobs" counts them
    ("jobs", "jobs"),
    ("images", "images"),
    ("tiles_in", "tiles in"),
    ("tiles_out", "tiles out"),
    ("megapixels_in", "MP in"),
    ("megapixels_out", "MP out"),
    ("steps", "steps"),
    ("engine_seconds", "engine s"),
)


def usage_totals(jobs: Sequence[Job]) -> dict[str, dict[str, float]]:
    """Per key (sorted by name): the sums of the succeeded jobs' usage, and their count as `jobs`."""
    totals: dict[str, dict[str, float]] = {}
    for job in jobs:
        row = totals.setdefault(job.owner, dict.fromkeys((name for name, _ in USAGE_COLUMNS), 0.0))
        row["jobs"] += 1
        if job.usage is not None:
            for name, _ in USAGE_COLUMNS[1:]:
                row[name] += float(getattr(job.usage, name))
    return dict(sorted(totals.items()))


def usage_report(jobs: Sequence[Job]) -> list[str]:
    """`kleinserve usage`'s table: a header line, a line per key, and a total line when there are several."""
    totals = usage_totals(jobs)
    header = ["key", *(title for _, title in USAGE_COLUMNS)]
    rows = [
        [owner, *(_figure(name, row[name]) for name, _ in USAGE_COLUMNS)] for owner, row in totals.items()
    ]
    if len(rows) > 1:
        grand = {name: sum(row[name] for row in totals.values()) for name, _ in USAGE_COLUMNS}
        rows.append(["total", *(_figure(name, grand[name]) for name, _ in USAGE_COLUMNS)])
    widths = [max(len(line[i]) for line in (header, *rows)) for i in range(len(header))]
    return [
        "  ".join(
            [line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))]
        ).rstrip()
        for line in (header, *rows)
    ]


def _figure(name: str, value: float) -> str:
    if name.startswith("megapixels"):
        return f"{value:.4f}"
    if name == "engine_seconds":
        return f"{value:.3f}"
    return str(int(value))
