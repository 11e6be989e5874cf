"""What a night does: which input files to read, and whether their ids may be written.

:func:`plan_night` compares the input listing with the committed sources table, file by
file, on the driver (O(files), no data read): an input file whose size and identity are
unchanged is skipped without being opened. The rest of the work is about ids, and runs
on the cluster, never holding O(rows) on the driver:

:func:`check_ids` makes sure, before any row is featurized, that the ids this night
writes are unique: among the files read this night (an id twice is a duplicate: the run
stops with exit 2, naming examples), and against the rows other input files wrote on
earlier nights. For the latter, only the committed files whose id range (``id_min``,
``id_max`` in the sources table) overlaps the id range of a file read this night are
opened, and only their id column: ids that grow over time (sequence numbers, timestamps,
date-prefixed or UUIDv7 ids) make this free; random ids make it read the id column of
every committed file. An id found in an input file that is still in the input unchanged
is a duplicate; one whose old file is gone or was rewritten without it has **moved**: its
old row is removed from its old output file.

The same check names, for each file read this night, its **donors**: the committed data files
of other sources that hold some of its ids. When the lake rewrites files (a Delta ``MERGE``,
``DELETE`` or ``OPTIMIZE``, Iceberg's ``delete``, ``upsert`` or ``rewrite_data_files``, a
Parquet file renamed or re-partitioned), the rows of the new file come from the files it
replaced: the sources the input no longer lists (or lists changed), whose output files are
still committed until this night's commit. The read task compares the new file's rows with
its donors' ids and content hashes, and the rows unchanged there are **carried**: copied from
the donor's output file, not featurized (:mod:`pipelines.job.finalize`). The driver learns only
(file, donor, count) triples, O(files), with or without ``--prune``: the ids that moved out of a
source the night keeps (they must be removed from its output file) are written by the bucket
tasks to the run's scratch area, one folder per source (:func:`moved_ids_path`), and read there
by the task that rewrites that source's output file.

Both checks hash-partition the ids into buckets of about ``ID_BUCKET_ROWS`` ids, written
as small Parquet files to the run's staging area by one Ray task per group of files of about
``SCAN_TASK_ROWS`` ids (a compaction night of 10M rows: 10 tasks, not 250), then checked by
one Ray task per bucket. A night of a few thousand rows costs a fraction of a
second; Ray Data's own ``groupby`` cost 11-15 s even for 2,000 ids on 2 cores (measured),
which is why it is not used here.
"""
from __future__ import annotations

import bisect
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError

from pipelines.formats.sources import read_columns
from pipelines.layout import INTERNAL_SUFFIX
from pipelines.manifest import Manifest
from pipelines.storage import InputFile, Location, list_files
from pipelines.tasks import Tasks

ID_BUCKET_ROWS = 2_000_000
SCAN_TASK_ROWS = 1_000_000  # ids one scan task reads (several files)
NEW, CHANGED, RETRY, PRUNE, MOVED = "new", "changed", "retry", "prune", "moved"


@dataclass
class SourceWork:
    """One input file (a source) this night touches.

    ``kind``: ``new`` (never featurized), ``changed`` (size or identity differ),
    ``retry`` (unchanged, but ``--retry-failed`` and it has failed rows), ``prune``
    (unchanged, but ``--prune`` and it keeps rows the file no longer has), ``moved``
    (unchanged or gone, but ids it held are now written from another file).
    ``old`` is its row of the committed sources table, if any.
    """

    source: str
    kind: str
    input: InputFile | None
    old: dict[str, Any] | None
    moved_ids: Location | None = None  # scratch folder of the ids it lost to other files (:func:`read_moved_ids`)
    donors: list[str] = field(default_factory=list)  # committed data files of other sources holding its ids

    @property
    def reads_payloads(self) -> bool:
        """Whether the night reads this file's rows (else it only rewrites its output)."""
        return self.kind in (NEW, CHANGED, RETRY)


@dataclass
class NightPlan:
    """The sources a night touches, and what it leaves as it is."""

    work: dict[str, SourceWork]
    unchanged: list[InputFile]
    listed: set[str] = field(default_factory=set)
    committed: dict[str, dict[str, Any]] = field(default_factory=dict)  # the sources table, by source
    dropped: list[dict[str, Any]] = field(default_factory=list)  # gone from the input, removed by --prune
    absent: list[str] = field(default_factory=list)  # gone from the input, kept

    @property
    def to_read(self) -> list[SourceWork]:
        """Sources whose input file is read this night, in source order."""
        return [work for work in self.work.values() if work.reads_payloads]


def plan_night(
    listing: Sequence[InputFile],
    manifest: Manifest | None,
    *,
    incremental: bool,
    prune: bool,
    retry_failed: bool,
) -> NightPlan:
    """Classify every input file and every committed source (see :class:`SourceWork`)."""
    if not incremental or manifest is None:
        work = {f.relpath: SourceWork(f.relpath, NEW, f, None) for f in listing}
        return NightPlan(work, [], set(work))
    old_rows = {row["source"]: row for row in manifest.sources.to_pylist()}
    work: dict[str, SourceWork] = {}
    unchanged: list[InputFile] = []
    for info in listing:
        old = old_rows.get(info.relpath)
        if old is None:
            work[info.relpath] = SourceWork(info.relpath, NEW, info, None)
        elif (old["size"], old["identity"]) != (info.size, info.identity):
            work[info.relpath] = SourceWork(info.relpath, CHANGED, info, old)
        elif retry_failed and old["errors"]:
            work[info.relpath] = SourceWork(info.relpath, RETRY, info, old)
        elif prune and old["orphans"]:
            work[info.relpath] = SourceWork(info.relpath, PRUNE, info, old)
        else:
            unchanged.append(info)
            if not old["present"]:
                work[info.relpath] = SourceWork(info.relpath, MOVED, info, old)  # back: mark present
    listed = {info.relpath for info in listing}
    gone = [row for source, row in old_rows.items() if source not in listed]
    plan = NightPlan(work, unchanged, listed, old_rows)
    for row in gone:
        if prune:
            plan.dropped.append(row)
        else:
            plan.absent.append(row["source"])
    return plan


# -- id checks -------------------------------------------------------------------------------


def _bucket_of(ids: pa.Array, buckets: int) -> np.ndarray:
    """Bucket of each id, stable across processes (not Python's salted ``hash``)."""
    import pandas as pd

    if buckets == 1:
        return np.zeros(len(ids), dtype=np.int64)
    hashes = pd.util.hash_array(ids.to_numpy(zero_copy_only=False))
    return (hashes % np.uint64(buckets)).astype(np.int64)


def _scatter(ids: pa.Array, tags: np.ndarray, buckets: int, directory: Location, name: str) -> None:
    """Write ``(id, tag)`` rows to one small file per non-empty bucket (null ids are left out)."""
    fs = directory.filesystem()
    valid = pc.is_valid(ids)
    ids, tags = ids.filter(valid), tags[valid.to_numpy(zero_copy_only=False)]
    assignment = _bucket_of(ids, buckets)
    for bucket in np.unique(assignment):
        chosen = assignment == bucket
        table = pa.table({"id": ids.filter(pa.array(chosen)), "tag": pa.array(tags[chosen], pa.int32())})
        path = directory.child_path(f"b{bucket:05d}", f"{name}{INTERNAL_SUFFIX}")
        fs.create_dir(posixpath.dirname(path), recursive=True)
        pq.write_table(table, path, filesystem=fs)


def _tagged(parts: list[tuple[int, pa.Array]], id_type: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """The ids of several files as one array, and each id's file tag."""
    ids = pa.chunked_array([chunk for _, part in parts for chunk in part.chunks] if parts else [], id_type)
    tags = np.concatenate([np.full(len(part), tag, np.int32) for tag, part in parts]) if parts else np.zeros(0, np.int32)
    return ids.combine_chunks(), tags


def _scan_new(location: Location, works: list[tuple[int, SourceWork]], id_column: str, id_type: pa.DataType,
              buckets: int, directory: Location) -> list[tuple[Any, Any, int, str | None]]:
    """Ray task over a group of input files: each file's id range and null count, or why it cannot be
    read; the ids of the files read scattered to buckets together (one file per bucket and group)."""
    results, parts = [], []
    for tag, work in works:
        try:
            table = read_columns(location, work.input, [id_column])
        except Exception as exc:  # noqa: BLE001 - a corrupt file fails alone
            results.append((None, None, 0, f"cannot read input file {work.source}: {type(exc).__name__}: {exc}"))
            continue
        ids = table.column(0).cast(id_type)
        bounds = pc.min_max(ids)
        results.append((bounds["min"].as_py(), bounds["max"].as_py(), ids.null_count, None))
        parts.append((tag, ids))
    ids, tags = _tagged(parts, id_type)
    _scatter(ids, tags, buckets, directory.join("new"), f"{works[0][0]:08d}")
    return results


def _scan_old(output: Location, sources: list[tuple[int, list[str]]], id_type: pa.DataType, buckets: int,
              directory: Location) -> None:
    """Ray task over a group of committed sources (tag, data and error file): their ids scattered to buckets."""
    fs = output.filesystem()
    parts = [
        (tag, pa.chunked_array([pq.read_table(output.child_path(name), columns=["id"], filesystem=fs).column(0).cast(id_type)
                                for name in names], id_type))
        for tag, names in sources
    ]
    ids, tags = _tagged(parts, id_type)
    _scatter(ids, tags, buckets, directory.join("old"), f"{sources[0][0]:08d}")


def _groups(rows: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive indices grouped so that a group holds about ``limit`` rows (a bigger item alone):
    one scan task per group, not per file, so that 10^5 small files do not cost 10^5 tasks and
    10^5 x buckets tiny files."""
    groups: list[list[int]] = []
    held = 0
    for index, count in enumerate(rows):
        if not groups or held + count > limit:
            groups.append([])
            held = 0
        groups[-1].append(index)
        held += count
    return groups


def moved_ids_path(directory: Location, old_tag: int) -> Location:
    """The scratch folder of the ids that the committed source ``old_tag`` of an id check lost to other files."""
    return directory.join("moved", f"t{old_tag:08d}")


def read_moved_ids(folder: Location | None) -> pa.Array:
    """The ids written to ``folder`` by the bucket tasks (:func:`moved_ids_path`), as strings; none for None."""
    if folder is None:
        return pa.array([], pa.string())
    fs = folder.filesystem()
    files = list_files(fs, folder.path, INTERNAL_SUFFIX)
    chunks = [chunk for f in files for chunk in pq.read_table(f.path, filesystem=fs).column("id").cast(pa.string()).chunks]
    return pa.chunked_array(chunks, pa.string()).combine_chunks()


def _check_bucket(directory: Location, bucket: int, examples: int,
                  own: dict[int, int], dropped: set[int]) -> tuple[int, list, list[tuple[int, int, int, list | None]]]:
    """Ray task: duplicates among the night's ids of one bucket, and their collisions with old ids.

    Returns (number of duplicated ids, a few examples, collisions as ``(new_tag, old_tag, count,
    examples)``). A pair whose old tag is neither the new file's own old version (``own``: new
    tag -> old tag) nor a source that ``--prune`` removes whole (``dropped``) is a move: its ids
    are written to :func:`moved_ids_path` and a few of them returned (for the duplicate error);
    the other pairs only name a donor of carried rows (:func:`_name_donors`), examples None. So
    the driver receives counts, never a compaction's ids.
    """
    fs = directory.filesystem()

    def load(kind: str) -> pa.Table | None:
        files = list_files(fs, directory.child_path(kind, f"b{bucket:05d}"), INTERNAL_SUFFIX)
        return pa.concat_tables([pq.read_table(f.path, filesystem=fs) for f in files]) if files else None

    new = load("new")
    if new is None:
        return 0, [], []
    counts = pc.value_counts(new.column("id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        return len(repeated), repeated.field("values")[:examples].to_pylist(), []
    old = load("old")
    if old is None:
        return 0, [], []
    joined = new.join(old, keys="id", left_suffix="_new", right_suffix="_old", join_type="inner")
    pairs = joined.group_by(["tag_new", "tag_old"]).aggregate([("id", "count")]).to_pylist()
    collisions, moved = [], {}
    for pair in pairs:
        new_tag, old_tag, count = pair["tag_new"], pair["tag_old"], pair["id_count"]
        found = None
        if old_tag not in dropped and own.get(new_tag) != old_tag:
            chosen = pc.and_(pc.equal(joined.column("tag_new"), new_tag), pc.equal(joined.column("tag_old"), old_tag))
            ids = joined.column("id").filter(chosen).combine_chunks()
            moved.setdefault(old_tag, []).append(ids)
            found = ids[:examples].to_pylist()
        collisions.append((new_tag, old_tag, count, found))
    fs = directory.filesystem()
    for old_tag, parts in moved.items():
        folder = moved_ids_path(directory, old_tag)
        fs.create_dir(folder.path, recursive=True)
        pq.write_table(pa.table({"id": pa.concat_arrays(parts)}),
                       folder.child_path(f"b{bucket:05d}{INTERNAL_SUFFIX}"), filesystem=fs)
    return 0, [], collisions


@dataclass
class IdCheck:
    """Outcome of :func:`check_ids`: how many ids each committed source loses to other files."""

    moved: dict[str, int]
    null_ids: int
    opened: set[str]
    failed: dict[str, str] = field(default_factory=dict)  # source -> why it could not be read
    rehomed: int = 0  # rows of sources --prune removes whole whose ids a file read this night holds: not deleted


def check_ids(
    plan: NightPlan,
    *,
    input_location: Location,
    output: Location,
    scratch: Location,
    id_column: str,
    id_type: pa.DataType,
    input_rows: dict[str, int],
    tasks: Tasks,
) -> IdCheck:
    """Refuse duplicate ids before any featurizing; find the ids that moved between files.

    Raises ConfigError (exit 2) naming up to five repeated ids. Unchanged sources that
    turn out to hold a moved id are added to ``plan.work`` as ``moved``. The ids are hashed
    into buckets on scratch storage by tasks (the files read this night, and only the
    committed files whose id range overlaps theirs), then each bucket is checked by a task.
    """
    reads = plan.to_read
    if not reads:
        return IdCheck({}, 0, set())
    old_sources = list(plan.committed.values())
    total = sum(input_rows[w.source] for w in reads) + sum(row["rows"] + row["errors"] for row in old_sources)
    buckets = max(1, math.ceil(total / ID_BUCKET_ROWS))
    scan_new = tasks.remote(_scan_new, num_cpus=0.25)
    new_groups = _groups([input_rows[work.source] for work in reads], SCAN_TASK_ROWS)
    scanned = tasks.get([
        scan_new(input_location, [(tag, reads[tag]) for tag in group], id_column, id_type, buckets, scratch)
        for group in new_groups
    ])
    new_scans = [result for results in scanned for result in results]
    failed = {work.source: error for work, (_, _, _, error) in zip(reads, new_scans) if error}
    for source in failed:
        del plan.work[source]  # not committed this night; its previous output stays as it was
    own = {work.source: (lo, hi) for work, (lo, hi, _, _) in zip(reads, new_scans) if lo is not None}
    candidates = _overlapping_committed(old_sources, own)
    scan_old = tasks.remote(_scan_old, num_cpus=0.25)
    old_groups = _groups([row["rows"] + row["errors"] for row in candidates], SCAN_TASK_ROWS)
    tasks.get([
        scan_old(output, [(tag, [n for n in (candidates[tag]["file"], candidates[tag]["error_file"]) if n])
                          for tag in group], id_type, buckets, scratch)
        for group in old_groups
    ])
    dropped_sources = {row["source"] for row in plan.dropped}
    dropped = {old_tag for old_tag, row in enumerate(candidates) if row["source"] in dropped_sources}
    tag_of = {row["source"]: old_tag for old_tag, row in enumerate(candidates)}
    own = {new_tag: tag_of[work.source] for new_tag, work in enumerate(reads) if work.source in tag_of}
    check = tasks.remote(_check_bucket, num_cpus=0.25)
    results = tasks.get([check(scratch, bucket, 5, own, dropped) for bucket in range(buckets)])
    repeated = sum(count for count, _, _ in results)
    if repeated:
        examples = [str(v) for _, found, _ in results for v in found][:5]
        raise ConfigError(
            f"input ids are not unique ({repeated} repeated, e.g. {', '.join(examples)}); nothing was committed"
        )
    collisions = [pair for _, _, pairs in results for pair in pairs]
    rehomed = sum(count for _, old_tag, count, _ in collisions if old_tag in dropped)
    _name_donors(reads, candidates, collisions)
    moved = _moved_ids(plan, reads, candidates, collisions, scratch)
    null_ids = sum(nulls for _, _, nulls, _ in new_scans)
    opened = {name for row in candidates for name in (row["file"], row["error_file"]) if name}
    return IdCheck(moved, null_ids, opened, failed, rehomed)


def _overlapping_committed(old_sources: list[dict[str, Any]], own: dict[str, tuple[Any, Any]]) -> list[dict[str, Any]]:
    """The committed sources whose id range overlaps a file read this night (its own new version aside):
    the only committed files that can hold one of its ids."""
    starts = sorted(lo for lo, _ in own.values())
    ends = sorted(hi for _, hi in own.values())

    def overlapping(source: str, lo: Any, hi: Any) -> int:
        count = bisect.bisect_right(starts, hi) - bisect.bisect_left(ends, lo)
        mine = own.get(source)
        return count - (1 if mine and mine[0] <= hi and mine[1] >= lo else 0)

    return [
        row for row in old_sources
        if (row["file"] or row["error_file"]) and row["id_min"] is not None
        and overlapping(row["source"], row["id_min"], row["id_max"]) > 0
    ]


def _name_donors(reads: list[SourceWork], candidates: list[dict[str, Any]],
                 collisions: list[tuple[int, int, int, pa.Array | None]]) -> None:
    """Each file read this night learns the committed data files of other sources that hold some
    of its ids: its rows whose content is unchanged are carried from them (:mod:`pipelines.job.finalize`)."""
    for new_tag, old_tag in sorted({(new_tag, old_tag) for new_tag, old_tag, _, _ in collisions}):
        work, owner = reads[new_tag], candidates[old_tag]
        if owner["source"] != work.source and owner["file"] and owner["file"] not in work.donors:
            work.donors.append(owner["file"])


def _moved_ids(plan: NightPlan, reads: list[SourceWork], candidates: list[dict[str, Any]],
               collisions: list[tuple[int, int, int, list | None]], scratch: Location) -> dict[str, int]:
    """How many ids each committed source lost to a file read this night (a move); ConfigError when the
    source keeping them is unchanged in the input (a true duplicate). Adds those sources to ``plan.work``,
    pointing at the scratch folder of their moved ids. Pairs without examples are a source's own old
    version or a source that --prune removes whole."""
    moved: dict[int, int] = {}
    for new_tag, old_tag, count, examples in collisions:
        if examples is None:
            continue
        new_source, owner = reads[new_tag].source, candidates[old_tag]
        owner_work = plan.work.get(owner["source"])
        if owner["source"] in plan.listed and not (owner_work and owner_work.reads_payloads):
            raise ConfigError(
                f"input ids are not unique: {', '.join(map(str, examples))} in {new_source} are also in "
                f"{owner['source']}, which is unchanged in the input; nothing was committed"
            )
        moved[old_tag] = moved.get(old_tag, 0) + count
    for old_tag in moved:
        old = candidates[old_tag]
        work = plan.work.get(old["source"])
        if work is None:
            work = plan.work[old["source"]] = SourceWork(old["source"], MOVED, None, old)
        work.moved_ids = moved_ids_path(scratch, old_tag)
    return {candidates[old_tag]["source"]: count for old_tag, count in moved.items()}

