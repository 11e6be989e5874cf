"""The prepared GPU check (benchmarks/gpu_check.sh) in its --smoke mode, so that it cannot rot
between the rare runs on a lent GPU: every part runs on the CPU and leaves figures in the JSON
(the engine part in the bare-image test, the others in the full one), the check survives a
bare lent image, and the carried wheel folders fit a device call."""
from __future__ import annotations

import json
import math
import re
import socket
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_carry  # noqa: E402
ENGINE_FIGURES = ("rows_per_s", "floor_rows_per_s", "ratio_to_floor", "peak_mib")
FIGURES = {
    "fungivision": ("fungivision_rows_per_s", "fungi_rows_per_s", "speedup", "fungivision_peak_mib"),
    "pipeline": ("end_to_end_rows_per_s", "steady_rows_per_s", "wall_s", "utilisation_samples"),
    "dense": ("rows_per_s", "peak_mib"),
}


def assert_figures(rows: list[dict], names: tuple[str, ...]) -> None:
    assert rows
    for row in rows:
        for name in names:
            assert isinstance(row[name], (int, float)) and math.isfinite(row[name]) and row[name] >= 0, (name, row)


def trimmed_ray(directory: Path) -> Path:
    """The installed ray as the carried wheel holds it (without :data:`gpu_carry.TRIM`'s files),
    as a folder of links to be put first on PYTHONPATH."""
    import ray

    source = Path(ray.__file__).parent
    pattern = "|".join(f"(?:{p})" for p in gpu_carry.TRIM["ray"])
    kept = 0
    for path in source.rglob("*"):
        relative = path.relative_to(source.parent).as_posix()
        # the bytecode too: without it every Ray process compiles ray anew, and on a busy machine
        # the raylet gave up waiting for its dashboard agent
        if path.is_dir() or re.fullmatch(pattern, relative):
            continue
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).symlink_to(path)
        kept += 1
    assert kept > 1000 and not (directory / "ray" / "jars").exists()
    return directory


def test_gpu_check_smoke_writes_every_part_with_numbers(tmp_path: Path) -> None:
    """Every part but the engine (the bare-image test below runs that one), with the ray of the
    carried wheel, trimmed (issue 36; the 8 rows run in the driver: Ray's start costs minutes on
    a busy machine, see benchmarks/README.md for the same check on Ray)."""
    output = tmp_path / "gpu_check.json"
    ray_path = trimmed_ray(tmp_path / "trimmed")
    env = {**os.environ, "PYTHON": sys.executable, "RAY_USAGE_STATS_ENABLED": "0", "FUNGI_CARRY_SITE": str(tmp_path / "site"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ray_path), os.environ.get("PYTHONPATH")]))}
    which = subprocess.run([sys.executable, "-c", "import ray; print(ray.__file__)"], env=env, capture_output=True, text=True)
    assert which.stdout.strip() == str(ray_path / "ray" / "__init__.py"), which.stderr
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--parts", "pipeline,fungivision,dense", "--output", str(output)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    data = json.loads(output.read_text())
    assert data["smoke"] and not data["skipped"] and not data["failed"]
    assert set(data["parts"]) == set(FIGURES)
    for part, names in FIGURES.items():
        assert_figures(data["parts"][part], names)
    pipeline = data["parts"]["pipeline"][0]
    assert pipeline["rows"] == 8
    # 8 rows' steady part can be shorter than the 200 ms sampling period: then no figure, not a made-up one
    assert (pipeline["utilisation_pct"] is None) == (pipeline["utilisation_samples"] == 0)
    assert set(data["verdict"]) == set(data["targets"])
    assert data["verdict"]["vs_fungivision"] is not None
    assert "| fungivision |" in done.stdout and "| pipeline |" in done.stdout  # the printed table


BLOCKER = '''
import importlib.abc, os, sys

class _NotInImage(importlib.abc.MetaPathFinder):
    """A bare lent image: these packages are not installed."""
    blocked = set(os.environ["GPU_CHECK_TEST_BLOCK"].split(","))

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _NotInImage())
'''


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on: a package index that cannot be reached."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_gpu_check_on_a_bare_image_runs_the_engine_and_lists_the_rest_as_failed(tmp_path: Path) -> None:
    """Issue 36: ray, fungivision and faiss missing, no index reachable, no carried folder:
    the check still exits 0, the engine part has figures, the other parts say why they did not run."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    output, site = tmp_path / "gpu_check.json", tmp_path / "site"
    env = {**os.environ, "PYTHON": sys.executable, "RAY_USAGE_STATS_ENABLED": "0", "FUNGI_CARRY_SITE": str(site),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])),
           "GPU_CHECK_TEST_BLOCK": "ray,fungivision,faiss", "FUNGI_GPU_CARRY": str(tmp_path / "no-carry"),
           # the only index: a closed port (no config file's extra index or wheel folder either)
           "PIP_INDEX_URL": f"http://127.0.0.1:{closed_port()}/simple", "PIP_CONFIG_FILE": os.devnull,
           # pip sees no installed ray/faiss/fungivision either (a --target install ignores the environment's)
           "PIP_TARGET": str(tmp_path / "pip-target")}
    for name in ("OUT", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        env.pop(name, None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--parts", "engine,pipeline,fungivision,dense",
         "--output", str(output)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    data = json.loads(output.read_text())
    engine = data["parts"]["engine"]
    assert {(row["modality"], row["precision"]) for row in engine} == {(m, p) for m in ("image", "text") for p in ("fp32", "bf16")}
    assert_figures(engine, ENGINE_FIGURES)
    assert all(row["min_cosine_to_fp32"] for row in engine if row["precision"] == "bf16")
    assert data["verdict"]["engine_images_per_s"] is not None
    assert set(data["parts"]) == {"engine"}
    failed = {entry.split(":")[0]: entry for entry in data["failed"]}
    assert set(failed) == {"pipeline", "fungivision", "dense"}, data["failed"]
    for part, module in (("pipeline", "ray"), ("fungivision", "fungivision"), ("dense", "faiss")):
        assert f"missing package: {module} (" in failed[part] and "the package index gave nothing (pip exit 1" in failed[part], failed[part]
    assert "| engine |" in done.stdout and "failed: pipeline" in done.stdout


def test_trim_wheel_cuts_the_files_and_their_record_lines(tmp_path: Path) -> None:
    wheel, trimmed = tmp_path / "pkg-1.0-py3-none-any.whl", tmp_path / "trimmed.whl"
    record = "pkg/__init__.py,sha256=a,1\npkg/jars/big.jar,sha256=b,2\npkg/ui/main.js.map,sha256=c,3\npkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("pkg/__init__.py", "pkg/jars/big.jar", "pkg/ui/main.js.map", "pkg/ui/main.js"):
            archive.writestr(name, b"x")
        archive.writestr("pkg-1.0.dist-info/RECORD", record)
    cut = gpu_carry.trim_wheel(wheel, trimmed, (r"pkg/jars/.*", r"pkg/ui/.*\.map"))
    assert sorted(cut) == ["pkg/jars/big.jar", "pkg/ui/main.js.map"]
    with zipfile.ZipFile(trimmed) as archive:
        assert sorted(archive.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py", "pkg/ui/main.js"]
        assert archive.read("pkg-1.0.dist-info/RECORD").decode() == "pkg/__init__.py,sha256=a,1\npkg-1.0.dist-info/RECORD,,\n"


@pytest.mark.skipif(not (gpu_carry.CARRY / "MANIFEST.json").exists(), reason="no .gpu-carry/ (bash benchmarks/gpu_check.sh --prepare-carry)")
def test_carried_folders_fit_the_device_calls() -> None:
    """Each folder <= 60 MiB, each call's folders and working tree <= 64 MiB, the wheels the manifest names there,
    ray trimmed; the printed calls within the device tool's limits (command < 2,000 characters, 12 minutes in all)."""
    manifest = json.loads((gpu_carry.CARRY / "MANIFEST.json").read_text())
    folders = sorted(p for p in gpu_carry.CARRY.iterdir() if p.is_dir())
    assert [f.name for f in folders] == [f["folder"] for f in manifest["folders"]]
    tree = gpu_carry.tree_bytes()
    for call in gpu_carry.device_calls(manifest["folders"]):
        carried = [ROOT / path for path in call["carry"]]
        sizes = [sum(w.stat().st_size for w in folder.glob("*.whl")) for folder in carried]
        assert carried and all(0 < size <= gpu_carry.FOLDER_LIMIT for size in sizes), sizes
        assert sum(sizes) + tree <= gpu_carry.CALL_LIMIT
        assert len(call["command"]) < 2000 and call["timeout_s"] <= 8 * 60
    assert sum(call["timeout_s"] for call in gpu_carry.device_calls(manifest["folders"])) + 120 <= 12 * 60  # + a start
    for folder in manifest["folders"]:
        assert sorted(folder["wheels"]) == sorted(w.name for w in (gpu_carry.CARRY / folder["folder"]).glob("*.whl"))
    (ray,) = gpu_carry.CARRY.glob("*/ray-*.whl")
    with zipfile.ZipFile(ray) as archive:
        assert not [n for n in archive.namelist() if n.startswith("ray/jars/") or n.endswith(".map")]
        assert "ray/_raylet.so" in archive.namelist()
