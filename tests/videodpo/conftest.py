"""Fixtures the video tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.videodpo.tiny_models import build_tiny_wan_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Wan T2V and I2V pipelines saved as `from_pretrained` folders, by task."""
    root = tmp_path_factory.mktemp("models")
    return {task: build_tiny_wan_pipeline(root / task, task) for task in ("t2v", "i2v")}
