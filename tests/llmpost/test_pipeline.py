"""The three-stage pipeline end to end on a tiny model, its CLI, and per-stage resume."""

import json
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from common.config import to_dict
from llmpost.cli import main as llmpost_main
from llmpost.config import (
    DapoConfig,
    DataConfig,
    EvalConfig,
    GenerationConfig,
    ModelConfig,
    PipelineConfig,
    SftConfig,
    TinyModelConfig,
)
from llmpost.pipeline import run_pipeline, run_stage, stage_dir
from llmpost.tasks import write_suite
from tests.killing import killed_after


@pytest.fixture(scope="module")
def assets(tmp_path_factory, word_tokenizer):
    root = tmp_path_factory.mktemp("assets")
    paths = write_suite(root / "data", n_train=20, n_eval=3, seed=0)
    word_tokenizer.save_pretrained(str(root / "tokenizer"))
    return root, paths


def _config(assets, run_dir):
    root, paths = assets
    gen = GenerationConfig(max_new_tokens=5)
    return PipelineConfig(
        run_dir=str(run_dir), seed=0,
        model=ModelConfig(tokenizer=str(root / "tokenizer"), tiny=TinyModelConfig(
            hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)),
        data=DataConfig(sns_train=[str(paths["sns_train"])],
                        general_train=[str(paths["general_train"])],
                        sns_eval=[str(paths["sns_eval"])], general_eval=[str(paths["general_eval"])]),
        stage1=DapoConfig(steps=4, prompts_per_step=6, group_size=4, lr=1e-2, save_every=2,
                          mini_batches=2, max_extra_rounds=1, overlong_buffer=2, generation=gen),
        stage2=SftConfig(steps=4, batch_size=8, lr=1e-2, general_fraction=0.25, save_every=2),
        stage3=DapoConfig(steps=2, prompts_per_step=6, group_size=4, lr=1e-2, save_every=1,
                          kl_coef=0.1,
                          hard_examples=True, hard_probe_per_task=3, generation=gen),
        eval=EvalConfig(per_task=3, max_new_tokens=5),
    )


def _weights(cfg, stage):
    return load_file(str(stage_dir(cfg, stage) / "model" / "model.safetensors"))


def test_pipeline_end_to_end_through_the_cli(assets, tmp_path, capsys):
    cfg = _config(assets, tmp_path / "run")
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    assert llmpost_main(["run", "--config", str(cfg_file)]) == 0
    printed = capsys.readouterr().out
    assert "== stage 3 ==" in printed and "sns_avg" in printed
    for stage in (0, 1, 2, 3):
        out = stage_dir(cfg, stage)
        result = json.loads((out / "eval.json").read_text())
        assert set(result["tasks"]) == {"taxonomy", "hashtags", "relevance", "mentions",
                                        "sentiment", "translation", "arithmetic", "copy_reverse"}
        assert (out / "done.json").exists() and (out / "model" / "config.json").exists()
        if stage:
            assert (out / "metrics.jsonl").exists()
    cap = json.loads((stage_dir(cfg, 1) / "capability_map.json").read_text())
    assert (stage_dir(cfg, 1) / "capability_map.png").exists()
    assert set(cap["weights"]) == set(cap["scores"])  # stage 2 covers every SNS task
    rl_log = [json.loads(x) for x in (stage_dir(cfg, 1) / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "accuracy", "response_length", "kept_share", "loss", "cap_hit"} <= set(rl_log[-1])
    assert any({"clip_frac", "entropy"} <= set(row) for row in rl_log)  # steps that trained
    assert any(k.endswith("/kept_share") for k in rl_log[-1])
    # The stages changed the model.
    assert any(not torch.equal(_weights(cfg, 1)[k], _weights(cfg, 3)[k]) for k in _weights(cfg, 1))

    # A finished pipeline is skipped on a second call; eval reads the last stage.
    assert llmpost_main(["run", "--config", str(cfg_file), "--stage", "2"]) == 0
    assert llmpost_main(["eval", "--config", str(cfg_file)]) == 0
    printed = capsys.readouterr().out
    assert str(stage_dir(cfg, 3) / "model") in printed
    stage3 = json.loads((stage_dir(cfg, 3) / "eval.json").read_text())
    again = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert again["tasks"] == stage3["tasks"]
    assert (tmp_path / "run" / "capability_map.png").exists() and "weak SNS tasks" in printed


def test_stage_needs_the_previous_one(assets, tmp_path, capsys):
    cfg = _config(assets, tmp_path / "run")
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    assert llmpost_main(["run", "--config", str(cfg_file), "--stage", "3"]) == 1
    assert "stage 3 needs stage 2 first" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_after_a_killed_stage_gives_the_same_model(assets, tmp_path, stage):
    straight = _config(assets, tmp_path / "straight")
    killed = _config(assets, tmp_path / "killed")
    for cfg in (straight, killed):
        for earlier in range(stage):
            run_stage(cfg, earlier)
    run_stage(straight, stage)
    with killed_after(3):  # after step 3; the last checkpoint is step 2
        run_stage(killed, stage)
    assert not (stage_dir(killed, stage) / "done.json").exists()
    run_stage(killed, stage)
    a, b = _weights(straight, stage), _weights(killed, stage)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    eval_a = json.loads((stage_dir(straight, stage) / "eval.json").read_text())
    eval_b = json.loads((stage_dir(killed, stage) / "eval.json").read_text())
    assert eval_a["tasks"] == eval_b["tasks"]
    log = [json.loads(x)["step"] for x in
           (stage_dir(killed, stage) / "metrics.jsonl").read_text().splitlines()]
    assert log[-1] == (straight.stage1.steps if stage == 1 else straight.stage2.steps)
    assert len(log) == len(set(log))  # step 3, logged before the kill, is not logged twice


def test_stage2_with_the_projector(assets, tmp_path):
    from common.regularizer import RegularizerConfig

    cfg = _config(assets, tmp_path / "run")
    cfg = replace(cfg, stage1=replace(cfg.stage1, steps=1), stage2=replace(
        cfg.stage2, steps=2, general_mode="projector",
        projector=RegularizerConfig(feasible="subset", fraction=0.5, n_general=4, path="ghost")))
    for stage in (0, 1, 2):
        run_stage(cfg, stage)
    log = [json.loads(x) for x in (stage_dir(cfg, 2) / "metrics.jsonl").read_text().splitlines()]
    assert "projector/cos_update_target" in log[-1]
    before, after = _weights(cfg, 1), _weights(cfg, 2)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["qwen3-4b.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    from common.config import load_config

    cfg = load_config(PipelineConfig, Path(__file__).parents[2] / "configs" / "llm" / name)
    assert cfg.stage1.eps_low == 0.2 and cfg.stage1.eps_high == 0.28
    assert cfg.stage3.hard_examples


def test_prompts_that_do_not_split_over_the_ranks_are_refused_before_training(assets, tmp_path):
    """`prompts_per_step` groups are split over the ranks: 6 over 4 ranks used to train on
    4 (6 // 4 = 1 a rank) without a word; now the run stops first, naming the key."""
    from unittest import mock

    from common.errors import ConfigError
    from llmpost.dapo_trainer import check_prompt_split

    cfg = _config(assets, tmp_path / "run")
    cfg = replace(cfg, stage1=replace(cfg.stage1, prompts_per_step=6))
    with mock.patch("llmpost.pipeline.rank_and_world", return_value=(0, 4)):
        with pytest.raises(ConfigError, match=r"stage1.prompts_per_step=6 does not split over 4 ranks"):
            run_pipeline(cfg)
    assert not (tmp_path / "run").exists()
    check_prompt_split(replace(cfg.stage1, prompts_per_step=8), 4)  # a multiple: accepted
    with pytest.raises(ConfigError, match="dapo.prompts_per_step=2 does not split over 4 ranks"):
        check_prompt_split(replace(cfg.stage1, prompts_per_step=2), 4)
