"""The prepared GPU check (benchmarks/gpu_check.sh) in its --smoke mode, so that it cannot rot
between the rare runs on a lent GPU: every part runs on the CPU and leaves figures in the JSON."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "engine": ("rows_per_s", "floor_rows_per_s", "ratio_to_floor", "peak_mib"),
    "fungivision": ("fungivision_rows_per_s", "fungi_rows_per_s", "speedup", "fungivision_peak_mib"),
    "pipeline": ("end_to_end_rows_per_s", "steady_rows_per_s", "wall_s", "utilisation_samples"),
    "dense": ("rows_per_s", "peak_mib"),
}


def test_gpu_check_smoke_writes_every_part_with_numbers(tmp_path: Path) -> None:
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--output", str(output)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    data = json.loads(output.read_text())
    assert data["smoke"] and not data["skipped"] and not data["failed"]
    for part, names in FIGURES.items():
        rows = data["parts"][part]
        assert rows, part
        for row in rows:
            for name in names:
                assert isinstance(row[name], (int, float)) and math.isfinite(row[name]) and row[name] >= 0, (part, name, row)
    engine = data["parts"]["engine"]
    assert {(row["modality"], row["precision"]) for row in engine} == {(m, p) for m in ("image", "text") for p in ("fp32", "bf16")}
    assert all(row["min_cosine_to_fp32"] for row in engine if row["precision"] == "bf16")
    pipeline = data["parts"]["pipeline"][0]
    assert pipeline["rows"] == 8
    # 8 rows' steady part can be shorter than the 200 ms sampling period: then no figure, not a made-up one
    assert (pipeline["utilisation_pct"] is None) == (pipeline["utilisation_samples"] == 0)
    assert set(data["verdict"]) == set(data["targets"])
    assert all(data["verdict"][name] is not None for name in ("engine_images_per_s", "pipeline_vs_engine", "vs_fungivision"))
    assert "| engine |" in done.stdout and "| pipeline |" in done.stdout  # the printed table
