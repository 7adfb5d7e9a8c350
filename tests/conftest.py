"""Session fixtures: every stage trained for 2 steps once, shared by the stage, upsampler and cascade tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import STAGES, train


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> Path:
    """``root/<stage>`` for every stage, trained for 2 steps with the real configs shrunk (``helpers.SMOKE``)."""
    root = tmp_path_factory.mktemp("runs")
    for stage in STAGES:
        result = train(root, stage)
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"
    return root
