"""The demo end to end at a toy budget: table, results, plots (slow)."""

import json

import pytest

from llmpost.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_at_a_toy_budget(tmp_path, capsys):
    from dataclasses import replace

    demo = DemoConfig(out=str(tmp_path / "demo"), n_train=40, n_eval=4, baseline_sft_steps=6)
    demo.pretrain = replace(demo.pretrain, steps=10, save_every=5)
    demo.stage1 = replace(demo.stage1, steps=2, prompts_per_step=4, save_every=1)
    demo.stage2 = replace(demo.stage2, steps=4, save_every=2)
    demo.stage3 = replace(demo.stage3, steps=2, prompts_per_step=4, save_every=1,
                          hard_probe_per_task=4)
    columns = run_demo(demo)
    printed = capsys.readouterr().out
    for name in ("base", "stage 1", "stage 2", "stage 3", "SFT (SNS only)", "SFT -> RL"):
        assert name in columns and name in printed
    assert "SNS avg" in printed and "General avg" in printed
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results) == set(columns)
    for plot in ("averages.png", "dapo_accuracy.png"):
        assert (tmp_path / "demo" / plot).stat().st_size > 0
