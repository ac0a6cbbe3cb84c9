"""Seed summaries: mean and sample standard deviation, as the demos and studies print them."""

from __future__ import annotations

import math

import pytest

from common.seed_summary import format_mean_std, mean_std, summarize_seeds


def test_mean_and_sample_std_over_seeds():
    assert format_mean_std([1.0, 2.0, 4.0]) == f"2.333 ± {math.sqrt(7 / 3):.3f}"
    assert format_mean_std([0.5], digits=4) == "0.5000 ± 0.0000"
    summary = summarize_seeds([{"a": {"m": 1.0, "x": float("nan")}}, {"a": {"m": 2.0, "x": float("nan")}},
                               {"a": {"m": 4.0, "x": float("nan")}}])
    assert mean_std(summary, "a", "m") == format_mean_std([1.0, 2.0, 4.0])
    assert summary["a"]["m"]["std"] == pytest.approx(math.sqrt(7 / 3))
    assert mean_std(summary, "a", "x") == "-" and mean_std(summary, "b", "m") == "-"
