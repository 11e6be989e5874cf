"""A small writer of Delta deletion vectors, for the tests (no installable writer makes them:
delta-rs does not, Spark's Delta needs jars from Maven).

It follows the Delta protocol ("Deletion Vectors" and the appendix "Deletion Vector Format"):
a vector is the magic number 1681511377 (4 bytes, little-endian) and a 64-bit RoaringBitmap in
the portable serialization (``pyroaring.BitMap64``), stored either inline in the log
(``storageType`` ``i``, Z85 text) or in a vector file (``u``: ``<prefix>/deletion_vector_<uuid>.bin``,
the UUID Z85-encoded in the descriptor; the file is a version byte ``1``, then per vector its size
and CRC-32, big-endian, around its bytes; ``offset`` is where its size starts). One call commits
one version that removes each target file's logical file and adds it again with its new vector,
as Spark's DELETE does. The table must support the ``deletionVectors`` reader and writer feature
(reader version 3, writer version 7): create it with ``delta.enableDeletionVectors=true``.
"""
from __future__ import annotations

import json
import struct
import time
import uuid
import zlib
from pathlib import Path

from pyroaring import BitMap64

from pipelines.formats.sources import DV_MAGIC, Z85_ALPHABET


def z85_encode(data: bytes) -> str:
    """Z85 of ``data`` padded with zero bytes to a multiple of 4 (readers cut it to ``sizeInBytes``)."""
    data += b"\0" * (-len(data) % 4)
    text = []
    for start in range(0, len(data), 4):
        value, group = int.from_bytes(data[start:start + 4], "big"), []
        for _ in range(5):
            value, digit = divmod(value, 85)
            group.append(Z85_ALPHABET[digit])
        text.extend(reversed(group))
    return "".join(text)


def serialize(positions: list[int]) -> bytes:
    """One deletion vector's bytes: the magic number and the portable 64-bit RoaringBitmap."""
    return struct.pack("<I", DV_MAGIC) + BitMap64(positions).serialize()


def live_adds(lake: Path) -> dict[str, dict]:
    """The add action of each live file, replayed from the JSON commits (the tests' tables keep them all)."""
    adds: dict[str, dict] = {}
    for commit in sorted((lake / "_delta_log").glob("*.json")):
        for line in commit.read_text().splitlines():
            action = json.loads(line)
            if "remove" in action:
                adds.pop(action["remove"]["path"], None)
            if "add" in action:
                adds[action["add"]["path"]] = action["add"]
    return adds


def delete_rows(lake: Path, deleted: dict[str, list[int]], storage: str = "i", prefix: str = "") -> int:
    """Commit a version in which each file of ``deleted`` (its log path) has a deletion vector of
    exactly those row positions (all its deleted rows: a vector replaces the file's previous one).
    ``storage`` ``i`` writes them inline, ``u`` into one new vector file under ``prefix``. Returns the version."""
    log = lake / "_delta_log"
    protocol = next(json.loads(line)["protocol"] for line in (log / f"{0:020d}.json").read_text().splitlines()
                    if "protocol" in line)
    assert protocol["minReaderVersion"] == 3 and "deletionVectors" in protocol["readerFeatures"], protocol
    assert protocol["minWriterVersion"] == 7 and "deletionVectors" in protocol["writerFeatures"], protocol
    adds, now = live_adds(lake), int(time.time() * 1000)
    vectors = {path: serialize(sorted(positions)) for path, positions in deleted.items()}
    descriptors = {}
    if storage == "i":
        for path, data in vectors.items():
            descriptors[path] = {"storageType": "i", "pathOrInlineDv": z85_encode(data), "sizeInBytes": len(data)}
    else:
        file_id = uuid.uuid4()
        content, offset = bytearray(b"\x01"), 1
        for path, data in vectors.items():
            descriptors[path] = {"storageType": "u", "pathOrInlineDv": prefix + z85_encode(file_id.bytes),
                                 "offset": offset, "sizeInBytes": len(data)}
            content += struct.pack(">I", len(data)) + data + struct.pack(">I", zlib.crc32(data))
            offset = len(content)
        (lake / prefix).mkdir(parents=True, exist_ok=True)
        (lake / prefix / f"deletion_vector_{file_id}.bin").write_bytes(bytes(content))
    actions = [{"commitInfo": {"timestamp": now, "operation": "DELETE", "operationParameters": {},
                               "engineInfo": "fungi-tests delta_dv"}}]
    for path, descriptor in descriptors.items():
        old = adds[path]
        descriptor["cardinality"] = len(deleted[path])
        remove = {"path": path, "dataChange": True, "deletionTimestamp": now, "extendedFileMetadata": True,
                  "partitionValues": old["partitionValues"], "size": old["size"]}
        if old.get("deletionVector"):
            remove["deletionVector"] = old["deletionVector"]
        actions += [{"remove": remove}, {"add": {**old, "dataChange": True, "deletionVector": descriptor}}]
    version = max(int(p.name[:20]) for p in log.glob("*.json")) + 1
    (log / f"{version:020d}.json").write_text("\n".join(json.dumps(a) for a in actions) + "\n")
    return version
