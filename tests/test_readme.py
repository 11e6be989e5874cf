"""The README's commands run as written.

Fenced ``bash`` blocks preceded by ``<!-- runnable -->`` are executed in order, in one
temporary directory, by ``bash -euo pipefail``, with this interpreter's ``bin`` directory
first on ``PATH`` (so ``python`` and ``fungi`` are the ones under test). The two set-up
commands are not run here (they install packages); they are checked against ``.ci/run``.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
SETUP_COMMANDS = ("pip install -e . && fungi demo", 'pip install -e ".[test]" && python -m pytest -q')
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
RUNNABLE = re.compile(r"<!-- runnable -->\s*```bash\n(.*?)```", re.S)


def runnable_blocks() -> list[str]:
    return RUNNABLE.findall(README)


def test_setup_section_has_exactly_the_two_commands():
    section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = [body.strip() for lang, body in BLOCK.findall(section) if lang == "bash"]
    assert blocks == list(SETUP_COMMANDS)
    ci = (REPO / ".ci" / "run").read_text()
    assert SETUP_COMMANDS[1] in ci.splitlines(), ".ci/run must call the README's test command verbatim"


def test_measured_table_section_is_marked():
    assert README.count("<!-- measured-table -->") == 1
    assert README.count("<!-- /measured-table -->") == 1


def test_readme_mentions_only_real_commands_and_options():
    from pipelines.cli import COMMANDS, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    checked = set()
    for lang, body in BLOCK.findall(README):
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            for match in re.finditer(r"(?:^|[\s;&|(])fungi (\w+)(.*)", line):
                command = match.group(1)
                assert command in COMMANDS, f"README: no command `fungi {command}`"
                known = {opt for action in subparsers[command]._actions for opt in action.option_strings}
                words = shlex.split(re.split(r"&&|\|\||;", match.group(2))[0], comments=True)
                for word in words:
                    if word == "--":
                        break  # what follows is the submitted command
                    if word.startswith("--"):
                        assert word.split("=")[0] in known, f"README: `fungi {command}` has no option {word}"
                checked.add(command)
    assert checked == set(COMMANDS)


def test_there_are_runnable_blocks():
    blocks = runnable_blocks()
    assert len(blocks) >= 2
    assert any("fungi featurize --input" in b for b in blocks)


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory, local_ray) -> tuple[Path, dict[str, str]]:
    workdir = tmp_path_factory.mktemp("readme")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # the session's Ray (what `fungi featurize` does when it starts its own is tested by
    # test_demo and test_reliability's subprocess): no Ray start-up per command
    env["RAY_ADDRESS"] = local_ray
    return workdir, env


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_runnable_block(index: int, shell_env):
    workdir, env = shell_env
    script = runnable_blocks()[index]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, (
        f"README block {index} failed ({result.returncode}):\n{script}\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    )
    if "fungi eval --train" in script:
        assert "| embedding+grad_kl+grad_simclr |" in result.stdout
        assert (workdir / "my_report" / "report.json").is_file()


def test_the_pyiceberg_snippet_opens_the_default_catalog(tiny_text_dir, tmp_path, monkeypatch, capsys):
    """The README's pyiceberg snippet opens a table fungi wrote into its default catalog (``fungi``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.job import FeaturizeConfig, run_featurize

    snippet = re.search(r"<!-- pyiceberg-default-catalog -->\s*```python\n(.*?)```", README, re.S).group(1)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["one cat", "two dogs", "three birds"],
                             "label": ["x", "y", "x"]}), tmp_path / "in" / "part-0.parquet")
    monkeypatch.chdir(tmp_path)  # the default warehouse, ./fungi_warehouse
    monkeypatch.delenv("FUNGI_WAREHOUSE", raising=False)
    run_featurize(FeaturizeConfig(input=str(tmp_path / "in"), output="iceberg:lake.features", modality="text",
                                  model=f"hf:{tiny_text_dir}", objectives="kl", keep_columns=("label",)))
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    snapshot, rows = capsys.readouterr().out.split()
    assert int(snapshot) > 0 and rows == "3"


@pytest.mark.parametrize("command", ["featurize", "submit"])
def test_help_examples_run_as_written_offline(command: str):
    """Each example of ``fungi COMMAND --help`` is one shell command per example (its line breaks
    kept), parses with the command's own options, and names the bundled model the README's way,
    which resolves offline (a hub id does not)."""
    from pipelines.cli import build_parser

    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices[command].format_help()
    lines = help_text.split("Examples", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    examples = lines[: next((i for i, line in enumerate(lines) if not line.startswith(" ")), len(lines))]
    assert all(len(line) <= 120 for line in examples), "an example's line breaks collapsed"
    script = "\n".join(examples)
    assert "hf:" not in script.replace('"hf:$(python', ""), "an example names a hub model id"
    # bash expands $MODEL and joins the continuation lines; each fungi line prints its argv as JSON
    shim = 'fungi() { python -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"; }\n'
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", shim + script], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    import json

    argvs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(argvs) == sum(line.lstrip().startswith("fungi ") for line in examples) >= 2
    for argv in argvs:
        if command == "submit":
            argv = argv[argv.index("--") + 1:]
        args = parser.parse_args(argv)
        if args.model.startswith("hf:"):
            assert Path(args.model[3:], "config.json").is_file(), args.model
