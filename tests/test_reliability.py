"""Bad settings and bad input, tried as a careless or hostile user would.

A bad setting exits 2 with one ``error:`` line before any data is read, writes nothing
and leaves the input untouched; a bad row or file is reported and loses nothing else.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main as cli_main
from pipelines.job import FeaturizeConfig, run_featurize


pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: one local Ray for the session


def write(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def good_input(root: Path) -> Path:
    write(root / "part-0.parquet", id=["a", "b", "c"], text=["one", "two", "three"], label=[0, 1, 0])
    write(root / "part-1.parquet", id=["d", "e"], text=["four", "five"], label=[1, 0])
    return root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def payloads(root: Path, values: list) -> list[str]:
    """Rewrite the input with these (wrongly typed) payloads."""
    write(root / "part-0.parquet", id=["a", "b", "c"], text=values[:3], label=[0, 1, 0])
    write(root / "part-1.parquet", id=["d", "e"], text=values[3:], label=[1, 0])
    return []


def weights_file(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    return path


def undecodable_setup_rows(tmp: Path, source: Path) -> list[str]:
    return ["--objectives", "kl,simclr:num_negatives=2", "--setup-from",
            str(write(tmp / "neg" / "part-0.parquet", id=["n0", "n1"], text=["", "  "]))]


# (name, how to break the input (tmp, input) -> extra CLI args, expected message)
CASES = {
    "output is the input (with --overwrite)": (
        lambda tmp, source: ["--output", str(source), "--overwrite"], "overlap"),
    "output inside the input": (lambda tmp, source: ["--output", str(source / "features")], "overlap"),
    "input inside the output": (lambda tmp, source: ["--output", str(tmp)], "overlap"),
    "output is a file": (
        lambda tmp, source: ["--output", str(write(tmp / "o.parquet", x=[1]))], "is a file"),
    "text column is int64": (lambda tmp, source: payloads(source, [12, 1, 2, 3, 4]), "column 'text' has type int64"),
    "text column is float": (lambda tmp, source: payloads(source, [1.5, 2, 3, 4, 5.0]), "column 'text' has type double"),
    "text column is int64 in one file only": (
        lambda tmp, source: write(source / "part-2.parquet", id=["x"], text=[12], label=[0]) and [],
        "column 'text' is string in"),
    "ids string here, int there": (
        lambda tmp, source: write(source / "part-2.parquet", id=[7], text=["x"], label=[0]) and [],
        "column 'id' is string in"),
    "data column missing from the second file": (
        lambda tmp, source: write(source / "part-2.parquet", id=["x"], body=["x"], label=[0]) and [],
        "data column 'text' not found in"),
    "every input file unreadable": (
        lambda tmp, source: [truncate(source / "part-1.parquet"), (source / "part-0.parquet").write_bytes(b"")] and [],
        "is not a readable Parquet file"),
    "duplicate ids in one file": (
        lambda tmp, source: write(source / "part-2.parquet", id=["x", "x"], text=["p", "q"], label=[0, 0]) and [],
        "input ids are not unique (1 repeated, e.g. x)"),
    "duplicate ids across files": (
        lambda tmp, source: write(source / "part-2.parquet", id=["a"], text=["again"], label=[0]) and [],
        "input ids are not unique (1 repeated, e.g. a)"),
    "projection dim negative": (lambda tmp, source: ["--projection-dim", "-3"], "must be >= 1, got -3"),
    "projection dim zero": (lambda tmp, source: ["--projection-dim", "0"], "must be >= 1, got 0"),
    "weights file that is not safetensors": (
        lambda tmp, source: ["--weights", str(weights_file(tmp))], "is not a valid .safetensors file"),
    "kept column clashes with an output column": (
        lambda tmp, source: ["--keep-columns", "event_time"], "would clash with output columns"),
    "prune without incremental": (lambda tmp, source: ["--prune"], "apply to --incremental runs"),
    "setup rows that do not decode": (undecodable_setup_rows, "2 drawn, e.g. n0: text is empty; n1: text is empty"),
    "event time column is not a timestamp": (
        lambda tmp, source: ["--event-time-column", "label"], "'label' is int64"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_settings_exit_2_with_one_line_write_nothing_and_keep_the_input(case, tiny_text_dir, tmp_path, capsys):
    breaker, message = CASES[case]
    source = good_input(tmp_path / "in")
    output = tmp_path / "out"
    extra = breaker(tmp_path, source) or []
    before = digest(source)  # after the breaker: the input as the user has it
    args = ["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
            "--model", f"hf:{tiny_text_dir}", "--actors", "1"]
    if "--output" in extra:
        args[4] = extra[extra.index("--output") + 1]
        extra = [a for i, a in enumerate(extra) if a != "--output" and (i == 0 or extra[i - 1] != "--output")]
    code = cli_main([*args, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert digest(source) == before  # the input is untouched
    target = Path(args[4])
    if target.is_dir() and target != source and target != tmp_path:
        assert not list(target.rglob("*.parquet")) and not (target / "_fungi_manifest.json").exists()
    assert not (source / "_fungi_manifest.json").exists() and not (tmp_path / "_fungi_manifest.json").exists()


def modality_input(root: Path, modality: str) -> Path:
    """Two rows of the modality's own payloads: only the model can be wrong."""
    from conftest import png_bytes, wav_bytes

    payload = {"text": ["one", "two"], "image": [png_bytes(32, 32), png_bytes(32, 32, 1)],
               "audio": [wav_bytes(0.2), wav_bytes(0.3)]}[modality]
    return write(root / "part-0.parquet", id=["a", "b"], **{modality: payload}).parent


@pytest.mark.parametrize("model, modality, message", [
    ("tiny_text_dir", "image", "is a text model, not an image one: use --modality text"),
    ("tiny_text_dir", "audio", "is a text model, not an audio one: use --modality text"),
    ("tiny_ast_dir", "text", "is an audio model, not a text one: use --modality audio"),
    ("tiny_ast_dir", "image", "is an audio model, not an image one: use --modality audio"),
    ("tiny_vit_dir", "text", "is an image model, not a text one: use --modality image"),
    ("tiny_vit_dir", "audio", "is an image model, not an audio one: use --modality image"),
])
def test_a_model_of_another_modality_is_refused_before_any_work(model, modality, message, request, tmp_path, capsys):
    """A text model given images (or any other pair) is one ``error:`` line and exit 2, not a traceback
    from inside its forward."""
    source, output = modality_input(tmp_path / "in", modality), tmp_path / "out"
    model_dir = request.getfixturevalue(model)
    capsys.readouterr()  # the fixture's own output, when it is made now
    code = cli_main(["featurize", "--input", str(source), "--output", str(output), "--modality", modality,
                     "--model", f"hf:{model_dir}", "--actors", "1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --model hf:") and message in lines[0], lines
    assert not output.exists() or not list(output.rglob("*.parquet"))


def test_a_missing_model_directory_says_it_does_not_exist(tmp_path, capsys):
    """``hf:/a/missing/dir`` (or ./, ../, ~) is a directory that is not there, not a malformed hub id."""
    source = good_input(tmp_path / "in")
    for missing in (str(tmp_path / "no" / "model"), "./no-such-model-dir", "~/no-such-model-dir"):
        code = cli_main(["featurize", "--input", str(source), "--output", str(tmp_path / "out"), "--modality", "text",
                         "--model", f"hf:{missing}", "--actors", "1"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and lines == [f"error: model directory '{missing}' does not exist "
                                       "(--model hf:<local directory or hub id>)"], lines


def corrupt_a_page(path: Path) -> None:
    """Overwrite the first data page header: the footer still reads, the rows do not."""
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36
    path.write_bytes(bytes(data))


def test_a_corrupt_file_fails_alone_and_the_rest_is_committed(tiny_text_dir, tmp_path, capsys):
    source, output = good_input(tmp_path / "in"), tmp_path / "out"
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["six", "seven"], "label": [0, 1]}), source / "part-2.parquet",
                   compression="none")
    corrupt_a_page(source / "part-2.parquet")
    code = cli_main(["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
                     "--model", f"hf:{tiny_text_dir}"])
    captured = capsys.readouterr()
    assert code == 1
    assert "cannot read input file part-2.parquet" in captured.err and "not committed" in captured.err
    assert sorted(pq.read_table(output).column("id").to_pylist()) == ["a", "b", "c", "d", "e"]
    manifest = json.loads((output / "_fungi_manifest.json").read_text())
    assert manifest["runs"][-1]["files_failed"][0].startswith("cannot read input file part-2.parquet")
    assert pq.read_table(output / "_errors").column("error")[0].as_py().startswith("cannot read input file part-2")
    # fixed overnight: the next incremental run picks the file up
    write(source / "part-2.parquet", id=["x", "y"], text=["six", "seven"], label=[0, 1])
    assert cli_main(["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
                     "--model", f"hf:{tiny_text_dir}", "--incremental"]) == 0
    assert sorted(pq.read_table(output).column("id").to_pylist()) == ["a", "b", "c", "d", "e", "x", "y"]


def test_an_empty_or_truncated_file_fails_alone_and_the_exit_code_follows_the_error_fraction(
        tiny_text_dir, tmp_path, capsys):
    """One 0-byte file dropped into the input (and a truncated one) must not block the night: each is listed
    with its reason, the other files are committed, and the exit code follows --max-error-fraction."""
    source, output = good_input(tmp_path / "in"), tmp_path / "out"
    write(source / "part-2.parquet", id=["x", "y"], text=["six", "seven"], label=[0, 1])
    write(source / "part-3.parquet", id=["z"], text=["eight"], label=[0])
    (source / "empty.parquet").write_bytes(b"")
    truncate(source / "part-3.parquet")
    args = ["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
            "--model", f"hf:{tiny_text_dir}"]
    assert cli_main(args) == 1  # 2 of 5 files failed > the default 1 %
    err = capsys.readouterr().err
    assert f"error: input file {source / 'empty.parquet'} is not a readable Parquet file (ArrowInvalid: Parquet file " \
           "size is 0 bytes); this file was not committed" in err
    assert "error: 2 of the 5 input files read could not be read (> --max-error-fraction 0.01)" in err
    assert sorted(pq.read_table(output).column("id").to_pylist()) == ["a", "b", "c", "d", "e", "x", "y"]
    record = json.loads((output / "_fungi_manifest.json").read_text())["runs"][-1]
    assert sorted(m.split(" is not")[0] for m in record["files_failed"]) == [
        f"input file {source / 'empty.parquet'}", f"input file {source / 'part-3.parquet'}"]
    assert record["files_read"] == 5
    errors = pq.read_table(output / "_errors").to_pylist()  # where every failure is listed, with its reason
    assert sorted((e["id"], e["stage"], e["error"].split(" is not")[0]) for e in errors) == [
        (None, "read", f"input file {source / 'empty.parquet'}"), (None, "read", f"input file {source / 'part-3.parquet'}")]

    # within the allowed fraction the night succeeds, the bad files still reported; a fixed file is picked up
    write(source / "part-3.parquet", id=["z"], text=["eight"], label=[0])
    assert cli_main([*args, "--incremental", "--max-error-fraction", "0.5"]) == 0
    assert "warning: input file" in capsys.readouterr().err
    assert sorted(pq.read_table(output).column("id").to_pylist()) == ["a", "b", "c", "d", "e", "x", "y", "z"]
    record = json.loads((output / "_fungi_manifest.json").read_text())["runs"][-1]
    assert [m.split(" is not")[0] for m in record["files_failed"]] == [f"input file {source / 'empty.parquet'}"]
    errors = pq.read_table(output / "_errors").to_pylist()  # the fixed file's failure is gone, the other stays
    assert [e["error"].split(" is not")[0] for e in errors] == [f"input file {source / 'empty.parquet'}"]


def test_an_unreadable_file_in_an_overwrite_is_said_to_have_lost_its_previous_features(tiny_text_dir, tmp_path, capsys):
    """``--overwrite`` replaces the output whole: an input file it cannot read keeps no features of the
    replaced output, and the warning says so (a plain run keeps them, and says that)."""
    source, output = good_input(tmp_path / "in"), tmp_path / "out"
    args = ["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
            "--model", f"hf:{tiny_text_dir}", "--max-error-fraction", "1"]
    assert cli_main(args) == 0
    truncate(source / "part-1.parquet")
    capsys.readouterr()
    assert cli_main([*args, "--incremental"]) == 0
    assert "not committed (its previous features are kept, the next run" in capsys.readouterr().err
    assert sorted(pq.read_table(output).column("id").to_pylist()) == ["a", "b", "c", "d", "e"]
    assert cli_main([*args, "--overwrite"]) == 0
    assert "not committed (--overwrite dropped its previous features, the next run" in capsys.readouterr().err
    assert sorted(pq.read_table(output).column("id").to_pylist()) == ["a", "b", "c"]


def test_a_null_id_is_reported_as_null_with_its_row(tiny_text_dir, tmp_path):
    source, output = tmp_path / "in", tmp_path / "out"
    write(source / "part-0.parquet", id=["a", None, "c"], text=["one", "two", "three"])
    summary = run_featurize(FeaturizeConfig(input=str(source), output=str(output), modality="text",
                                            model=f"hf:{tiny_text_dir}", max_error_fraction=0.5))
    assert summary.rows_written == 2 and summary.rows_failed == 1
    errors = pq.read_table(output / "_errors").to_pylist()
    assert errors[0]["id"] is None and errors[0]["error"] == "row 1 of part-0.parquet has a null 'id'"


def test_decode_errors_name_no_python_objects(tmp_path):
    from conftest import png_bytes

    source, output = tmp_path / "in", tmp_path / "out"
    write(source / "part-0.parquet", id=["ok", "bad"], image=[png_bytes(40, 40), b"definitely not an image"])
    summary = run_featurize(FeaturizeConfig(input=str(source), output=str(output), modality="image",
                                            model="timm:test_vit", weights="random", max_error_fraction=0.5))
    assert summary.rows_written == 1
    message = pq.read_table(output / "_errors").column("error")[0].as_py()
    assert message.startswith("cannot decode image") and " at 0x" not in message


@pytest.mark.parametrize("breaker, message", [
    (lambda tmp, source: payloads(source, [12, 1, 2, 3, 4]), "column 'text' has type int64"),  # from the footers
    (undecodable_setup_rows, "no decodable rows in"),  # found by a Ray task: its findings must not be logged there
], ids=["from the footers", "from a Ray task"])
def test_a_refusal_found_after_ray_started_is_one_line_on_the_real_stderr(breaker, message, tiny_text_dir, tmp_path,
                                                                         local_ray):
    """What a shell user sees (capsys above does not capture Ray's own logging): one line. The job joins
    the session's Ray (``--address``), as a job on a cluster does."""
    source = good_input(tmp_path / "in")
    extra = breaker(tmp_path, source)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "featurize", "--input", str(source), "--output", str(tmp_path / "out"),
         "--modality", "text", "--model", f"hf:{tiny_text_dir}", "--actors", "1", "--address", local_ray, *extra],
        capture_output=True, text=True, timeout=300, cwd=str(Path(__file__).resolve().parents[1]),
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
