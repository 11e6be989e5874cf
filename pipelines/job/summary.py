"""What a run did: the one-line summary the CLI prints, and the record the manifest keeps."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow.compute as pc

from pipelines.manifest import Manifest, RunRecord, fingerprint
from pipelines.job.plan import IdCheck, NightPlan
from pipelines.storage import InputFile


@dataclass(frozen=True)
class RunIdentity:
    """Who the run is, for its summary and record."""

    run_id: str
    started: float  # time.time() at the start
    mode: str  # incremental, overwrite or full
    output: str
    spec_hash: str
    max_error_fraction: float


@dataclass
class RunSummary:
    """What a run did, for the summary line and the exit code.

    The run fails (exit 1) when the input files it could not read (0 bytes, a corrupt page:
    each fails alone, the others are committed) exceed ``max_error_fraction`` of the files it
    read, or when the rows that failed for the first time exceed ``max_error_fraction`` of the
    rows it featurized: one bad file among 10^5 is reported, and the night succeeds.
    Rows that failed before with the same content are known failures: not retried unless
    ``--retry-failed``, and never counted against the threshold.
    """

    output: str
    spec_hash: str
    rows_in: int
    rows_skipped: int
    rows_written: int
    rows_failed_new: int
    rows_failed_known: int
    rows_deleted: int
    wall_s: float
    max_error_fraction: float
    files_failed: list[str] = dataclasses.field(default_factory=list)
    uncommitted: str | None = None  # why the run committed nothing (a new table with no feature row), if it did not
    files_read: int = 0  # the input files this run read or tried to (the failed ones included)
    rows_carried: int = 0
    first_write_s: float | None = None
    steady_rows_per_s: float | None = None

    @property
    def rows_failed(self) -> int:
        """Rows that failed in this run, new and known."""
        return self.rows_failed_new + self.rows_failed_known

    @property
    def rows_processed(self) -> int:
        """Rows this run featurized or tried to."""
        return self.rows_written + self.rows_failed

    @property
    def rows_featurized(self) -> int:
        """Rows the model computed (written or failed): what the night cost; carried rows cost none."""
        return self.rows_processed

    @property
    def failed_fraction(self) -> float:
        """New failures over the rows processed: what the threshold is judged on."""
        return self.rows_failed_new / self.rows_processed if self.rows_processed else 0.0

    @property
    def failed_files_fraction(self) -> float:
        """The input files that could not be read over the files this run read or tried to."""
        return len(self.files_failed) / self.files_read if self.files_read else float(bool(self.files_failed))

    @property
    def ok(self) -> bool:
        """Whether the run succeeded (see the class docstring)."""
        return max(self.failed_files_fraction, self.failed_fraction) <= self.max_error_fraction

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        rate = self.rows_processed / self.wall_s if self.wall_s else 0.0
        steady = (
            f" ({self.steady_rows_per_s:.1f} rows/s after the first write at {self.first_write_s:.0f} s)"
            if self.steady_rows_per_s is not None and self.first_write_s is not None
            else ""
        )
        known = f" + {self.rows_failed_known} known" if self.rows_failed_known else ""
        deleted = f", deleted {self.rows_deleted}" if self.rows_deleted else ""
        return (
            f"fungi: rows in {self.rows_in}, skipped {self.rows_skipped}, featurized {self.rows_featurized}, "
            f"carried {self.rows_carried}, written {self.rows_written}, "
            f"failed {self.rows_failed_new}{known} ({self.failed_fraction:.1%} new){deleted}, {rate:.1f} rows/s{steady}, "
            f"wall {self.wall_s:.1f} s -> {self.output} (spec {self.spec_hash})"
        )


def summarize(run: RunIdentity, manifest: Manifest, plan: NightPlan, results: list[dict[str, Any]],
          stats: list[dict[str, Any]], listing: list[InputFile], id_check: IdCheck) -> tuple[RunSummary, RunRecord]:
    """The run's summary line and its record in the manifest, from the finalize tasks' counts."""
    totals: dict[str, int] = {}
    for result in results:
        for key, value in result["counts"].items():
            totals[key] = totals.get(key, 0) + value
    failed_files = [*id_check.failed.values(), *(r["failed"] for r in results if r["failed"])]
    # a source --prune removes whole loses its rows, but for those whose ids another file now holds
    dropped_rows = sum(row["rows"] + row["errors"] for row in plan.dropped) - id_check.rehomed
    present = pc.filter(manifest.sources, manifest.sources.column("present"))
    rows_in = int(pc.sum(present.column("input_rows")).as_py() or 0)
    processed = totals.get("written", 0) + totals.get("failed_new", 0) + totals.get("failed_known", 0)
    carried = totals.get("carried", 0)
    wall = time.time() - run.started
    first_write_s, steady = _throughput(stats, run.started)
    summary = RunSummary(
        output=run.output, spec_hash=run.spec_hash, rows_in=rows_in, rows_skipped=max(0, rows_in - processed - carried),
        rows_written=totals.get("written", 0), rows_failed_new=totals.get("failed_new", 0),
        rows_failed_known=totals.get("failed_known", 0), rows_deleted=totals.get("deleted", 0) + dropped_rows,
        wall_s=wall, max_error_fraction=run.max_error_fraction, files_failed=failed_files, rows_carried=carried,
        files_read=len(plan.to_read) + len(id_check.failed), first_write_s=first_write_s, steady_rows_per_s=steady,
    )
    record = RunRecord(
        run_id=run.run_id,
        mode=run.mode,
        started=datetime.fromtimestamp(run.started, timezone.utc).isoformat(timespec="seconds"),
        wall_s=round(wall, 3),
        rows_in=rows_in,
        rows_skipped=summary.rows_skipped,
        rows_written=summary.rows_written,
        rows_featurized=summary.rows_featurized,
        rows_carried=carried,
        rows_replaced=totals.get("replaced", 0),
        rows_failed=summary.rows_failed,
        rows_failed_new=summary.rows_failed_new,
        rows_failed_known=summary.rows_failed_known,
        rows_removed_failed=totals.get("removed_failed", 0),
        rows_deleted=summary.rows_deleted,
        rows_moved=totals.get("moved", 0) + id_check.rehomed,
        files_read=summary.files_read,
        files_unchanged=len(plan.unchanged),
        files_failed=failed_files,
        output_files_opened=len(id_check.opened.union(*(r["opened"] for r in results))),
        output_files_written=totals.get("rewritten", 0),
        input_fingerprint=fingerprint(listing),
        first_write_s=first_write_s,
        steady_rows_per_s=steady,
    )
    return summary, record


def _throughput(stats: list[dict[str, Any]], started: float) -> tuple[float | None, float | None]:
    """(seconds to the first staged block, rows/s of the blocks staged after it).

    The end-to-end rate of a short run is dominated by start-up; the steady rate is what a
    long nightly run gets, and what scales with actors.
    """
    blocks = sorted((row["written_at"], row["rows"] + row["errors"]) for row in stats if row.get("written_at"))
    if not blocks:
        return None, None
    first = round(blocks[0][0] - started, 3)
    if len(blocks) < 2 or blocks[-1][0] <= blocks[0][0]:
        return first, None
    return first, round(sum(rows for _, rows in blocks[1:]) / (blocks[-1][0] - blocks[0][0]), 3)
