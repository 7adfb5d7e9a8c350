"""Session fixtures: every stage trained for 2 steps once, shared by the stage, upsampler and cascade tests."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import ROOT, STAGES, Ran, train_all


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> Path:
    """``root/<stage>`` for every stage, trained for 2 steps with the real configs shrunk (``helpers.SMOKE``)."""
    root = tmp_path_factory.mktemp("runs")
    for stage, result in train_all(root, STAGES).items():
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"
    return root


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[..., Ran]:
    """``python scripts/<script> args…`` in ``cwd``, run in this process: a fresh interpreter costs ~10 s of imports
    per call on CI's 2 cores. For scripts that only parse, check and exit; anything that trains or installs signal
    handlers runs as a real child process (``helpers.run_script``). An uncaught exception fails the test outright."""

    def run(script: str, *args: str, cwd: Path) -> Ran:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [script, *args])
        capsys.readouterr()
        code = 0
        try:
            runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run
