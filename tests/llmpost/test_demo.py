"""The demo end to end at a toy budget and two seeds: every arm (full and half data) runs
and is scored in distribution and out of distribution; results.json holds mean / std /
n_seeds per arm and metric and the claims; the half-data arms train on half the rows."""

import json
from dataclasses import replace

import pytest

from llmpost.demo import HALF, DemoConfig, run_demo
from llmpost.tasks import SNS_TASKS

ARMS = ("base", "stage 1", "stage 2", "stage 3", "SFT (SNS only)", "SFT + 10% general", "SFT -> RL",
        "stage 3" + HALF, "SFT + 10% general" + HALF, "SFT -> RL" + HALF)


def test_every_arm_runs_for_two_seeds_and_results_hold_the_spread_and_claims(tmp_path, capsys):
    demo = DemoConfig(out=str(tmp_path / "demo"), n_train=40, n_eval=2, baseline_sft_steps=3,
                      tiny_hidden=32, tiny_layers=1)
    demo.pretrain = replace(demo.pretrain, steps=4, batch_size=8, save_every=4)
    demo.stage1 = replace(demo.stage1, steps=1, prompts_per_step=4, group_size=2, save_every=1,
                          max_extra_rounds=0)
    demo.stage2 = replace(demo.stage2, steps=2, batch_size=8, save_every=2)
    demo.stage3 = replace(demo.stage3, steps=1, prompts_per_step=4, group_size=2, save_every=1,
                          hard_probe_per_task=2, max_extra_rounds=0)
    result = run_demo(demo, num_seeds=2)
    printed = capsys.readouterr().out
    out = tmp_path / "demo"
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_seeds"] == 2 and set(saved["arms"]) == set(ARMS)
    for arm in ARMS:
        assert f"| {arm} |" in printed
        for metric in ("sns_avg", "general_avg", "ood_sns_avg", "ood_general_avg"):
            stats = saved["arms"][arm][metric]
            assert stats["n_seeds"] == 2
            a, b = stats["values"]
            assert stats["mean"] == pytest.approx((a + b) / 2)
            assert stats["std"] == pytest.approx(abs(a - b) / 2 ** 0.5)
        for task in SNS_TASKS:
            assert saved["arms"][arm][f"ood/{task}"]["n_seeds"] == 2
    # the numbers are the per-seed evaluations
    seed1 = json.loads((out / "seed_1" / "columns.json").read_text())
    assert saved["arms"]["stage 3"]["ood_sns_avg"]["values"][1] == seed1["stage 3"]["ood"]["sns_avg"]
    assert result["per_seed"][0]["SFT -> RL"]["sns_avg"] == saved["arms"]["SFT -> RL"]["sns_avg"]["values"][0]
    # rows consumed: SFT steps x batch; SFT -> RL adds the DAPO prompts it drew
    assert saved["arms"]["SFT (SNS only)"]["rows_consumed"]["mean"] == 3 * 8
    rl_rows = saved["arms"]["SFT -> RL"]["rows_consumed"]["mean"] - 2 * 8
    assert rl_rows == (demo.stage1.steps + demo.stage3.steps) * demo.stage1.prompts_per_step
    # the half-data arms train on the first half of every task's rows
    half = [json.loads(line) for line in (out / "seed_0" / "data_half" / "sns_train.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in (out / "seed_0" / "data" / "sns_train.jsonl").read_text().splitlines()]
    assert len(half) == len(full) // 2
    assert all(r in full for r in half)
    half_cfg = (out / "seed_0" / "pipeline_half" / "config.yaml").read_text()
    assert "data_half/sns_train.jsonl" in half_cfg
    assert len(saved["claims"]) >= 4
    for claim in saved["claims"]:
        assert set(claim) == {"claim", "held", "evidence"} and isinstance(claim["held"], bool)
        assert ("[held]" if claim["held"] else "[did NOT hold]") + " " + claim["claim"] in printed
    for plot in ("averages.png", "dapo_accuracy.png"):
        assert (out / "seed_0" / plot).stat().st_size > 0
