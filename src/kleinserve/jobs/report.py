"""`kleinserve usage`: the succeeded jobs' metering (`JobUsage`, jobs/record.py) summed per key, as a table;
with `--by-adapter`, the images made with each LoRA adapter per key (the adapters: the jobs' `params.loras`).

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
    ("adapter_images", "adapter images"),
)
ADAPTER_COLUMNS = ("key", "adapter", "jobs", "images")


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
    return _aligned(header, rows)


def adapter_report(jobs: Sequence[Job]) -> list[str]:
    """`kleinserve usage --by-adapter`: a header line and a line per (key, adapter) with the succeeded jobs
    that applied the adapter and their images, sorted by key then adapter; jobs without adapters are left
    out. An adapter downloaded from a URL shows as `sha256:<hex>`, the name the job recorded."""
    counts: dict[tuple[str, str], list[int]] = {}
    for job in jobs:
        images = job.usage.images if job.usage is not None else 0
        for adapter in dict.fromkeys(choice.adapter for choice in job.params.loras):
            row = counts.setdefault((job.owner, adapter), [0, 0])
            row[0] += 1
            row[1] += images
    rows = [[owner, adapter, str(n), str(images)] for (owner, adapter), (n, images) in sorted(counts.items())]
    return _aligned(list(ADAPTER_COLUMNS), rows)


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a table: the first column left-aligned, the others right-aligned, two spaces apart."""
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
