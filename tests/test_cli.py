"""``fungi`` itself (pipelines.cli.main): how any command's failure reaches the user.

Bad input or settings end with one ``error:`` line and exit 2, a lease another run took over
with one line and exit 1, whichever command raised them: each command's ``run`` lets them
through to :func:`pipelines.cli.main` instead of catching them itself.
"""
from __future__ import annotations

import pytest

from fungi_ops.errors import ConfigError
from pipelines.cli import main
from pipelines.lease import LeaseLost


@pytest.mark.parametrize("command, args", [("vacuum", ["delta:/nowhere"]), ("featurize", [
    "--input", "in", "--output", "out", "--modality", "text", "--model", "hf:m"])])
@pytest.mark.parametrize("error, code", [
    (ConfigError("--retention-hours must be >= 0, got -1"), 2),
    (ValueError("Parquet magic bytes not found"), 2),
    (LeaseLost("another run (run-b) took the lease over: this run stopped before its commit"), 1),
])
def test_a_commands_bad_input_or_lost_lease_is_one_line_and_its_exit_code(command, args, error, code, monkeypatch, capsys):
    module = {"vacuum": "pipelines.commands.vacuum", "featurize": "pipelines.commands.featurize"}[command]

    def fail(_: object) -> int:
        raise error

    monkeypatch.setattr(f"{module}.run", fail)
    assert main([command, *args]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {error}"]
