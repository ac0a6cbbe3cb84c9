"""`llmpost demo [--out DIR]`: the RedOne 2.0 pipeline end to end on a CPU in minutes.

1. Synthetic SNS + general tasks (JSONL), a word-level tokenizer, a tiny Qwen3 base
   pretrained on the general tasks with a little SNS data.
2. The three stages (DAPO -> diagnose -> targeted SFT -> DAPO) through `llmpost.pipeline`.
3. The paper's ablation baselines from the same base at a similar step budget: SFT on
   SNS data only, SFT with the general share mixed in, SFT then RL.
4. A RedOne-style table (per-task scores, SNS / general averages) and plots.
The table reports what happened, whatever it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.config import add_config_args, config_from_args, save_config
from llmpost.config import (
    DapoConfig,
    DataConfig,
    DiagnoseConfig,
    EvalConfig,
    ModelConfig,
    PipelineConfig,
    SftConfig,
)
from llmpost.dapo_trainer import train_dapo
from llmpost.data import load_many
from llmpost.evaluate import eval_records, evaluate_tasks
from llmpost.pipeline import run_stage
from llmpost.policy import build_policy, save_policy
from llmpost.rewards import default_registry
from llmpost.rollout import GenerationConfig
from llmpost.sft import train_sft
from llmpost.tasks import GENERAL_TASKS, SNS_TASKS, vocabulary_words, write_suite
from llmpost.tokenizer import load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

HELP = "synthetic SNS + general tasks, tiny Qwen3, all three stages and the baselines"


@dataclass
class DemoConfig:
    out: str = "runs/llmpost-demo"
    seed: int = 0
    n_train: int = 2000  # rows per task
    n_eval: int = 64
    pretrain: SftConfig = field(default_factory=lambda: SftConfig(
        steps=1000, batch_size=32, lr=2e-3, general_fraction=0.75, save_every=500))
    stage1: DapoConfig = field(default_factory=lambda: DapoConfig(
        steps=24, prompts_per_step=16, group_size=8, lr=2e-4, general_fraction=0.3,
        max_extra_rounds=2, save_every=12, generation=GenerationConfig(max_new_tokens=8)))
    diagnose: DiagnoseConfig = field(default_factory=lambda: DiagnoseConfig(
        threshold=0.9, weak_weight=3.0))
    stage2: SftConfig = field(default_factory=lambda: SftConfig(
        steps=500, batch_size=32, lr=1e-3, general_fraction=0.1, save_every=250))
    stage3: DapoConfig = field(default_factory=lambda: DapoConfig(
        steps=16, prompts_per_step=16, group_size=8, lr=2e-4, general_fraction=0.2,
        max_extra_rounds=2, hard_examples=True, hard_probe_per_task=64, save_every=8,
        generation=GenerationConfig(max_new_tokens=8)))
    baseline_sft_steps: int = 600  # SFT-only baselines; about the pipeline's wall time
    baseline_general_fraction: float = 0.1
    tiny_hidden: int = 128
    tiny_layers: int = 2


def pipeline_config(demo: DemoConfig, paths: dict[str, Path], tokenizer_dir: Path,
                    base_dir: Path) -> PipelineConfig:
    return PipelineConfig(
        run_dir=str(Path(demo.out) / "pipeline"), seed=demo.seed,
        model=ModelConfig(path=str(base_dir), tokenizer=str(tokenizer_dir)),
        data=DataConfig(sns_train=[str(paths["sns_train"])],
                        general_train=[str(paths["general_train"])],
                        sns_eval=[str(paths["sns_eval"])],
                        general_eval=[str(paths["general_eval"])]),
        stage1=demo.stage1, diagnose=demo.diagnose, stage2=demo.stage2, stage3=demo.stage3,
        eval=EvalConfig(per_task=demo.n_eval, max_new_tokens=8),
    )


def build_base(demo: DemoConfig, paths: dict[str, Path], out: Path) -> tuple[Path, Path]:
    """Tokenizer and pretrained tiny base model (cached under `out`)."""
    tok_dir, base_dir = out / "tokenizer", out / "base_model"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer([" ".join(vocabulary_words())]).save_pretrained(str(tok_dir))
    if (base_dir / "config.json").exists():
        return tok_dir, base_dir
    tokenizer = load_tokenizer(tok_dir)
    cfg = ModelConfig()
    cfg.tiny = replace(cfg.tiny, hidden_size=demo.tiny_hidden, num_layers=demo.tiny_layers)
    model = build_policy(cfg, tokenizer, None, seed=demo.seed)
    sns, general = load_many([paths["sns_train"]]), load_many([paths["general_train"]])
    train_sft(model, tokenizer, sns, general, demo.pretrain, out / "pretrain", demo.seed)
    save_policy(model, tokenizer, base_dir)
    return tok_dir, base_dir


def run_baselines(demo: DemoConfig, cfg: PipelineConfig, out: Path) -> dict[str, dict[str, Any]]:
    """SFT-only, SFT + general share, SFT then RL; each from the same base."""
    registry = default_registry()
    sns, general = load_many(cfg.data.sns_train), load_many(cfg.data.general_train)
    evalset = eval_records(load_many(cfg.data.sns_eval + cfg.data.general_eval), demo.n_eval)
    rl_steps = demo.stage1.steps + demo.stage3.steps
    sft_budget = replace(demo.stage2, steps=demo.baseline_sft_steps)
    plans = {
        "SFT (SNS only)": [("sft", replace(sft_budget, general_fraction=0.0))],
        f"SFT + {demo.baseline_general_fraction:.0%} general": [
            ("sft", replace(sft_budget, general_fraction=demo.baseline_general_fraction))],
        "SFT -> RL": [("sft", replace(demo.stage2, general_fraction=demo.baseline_general_fraction)),
                      ("rl", replace(demo.stage1, steps=rl_steps))],
    }
    results = {}
    for i, (name, steps) in enumerate(plans.items()):
        run_dir = out / "baselines" / f"b{i}"
        done = run_dir / "eval.json"
        if done.exists():
            results[name] = json.loads(done.read_text())
            continue
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(cfg.model.path)
        model = build_policy(cfg.model, tokenizer, cfg.model.path)
        for j, (kind, stage_cfg) in enumerate(steps):
            stage_out = run_dir / f"{j}_{kind}"
            if kind == "sft":
                train_sft(model, tokenizer, sns, general, stage_cfg, stage_out, demo.seed + j)
            else:
                train_dapo(model, tokenizer, sns, general, stage_cfg, registry, stage_out,
                           demo.seed + j, model_path=cfg.model.path)
        result = evaluate_tasks(model, tokenizer, evalset, registry, cfg.eval)
        result["wall_s"] = time.perf_counter() - t0
        run_dir.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result, indent=2))
        results[name] = result
    return results


def format_table(columns: dict[str, dict[str, Any]]) -> str:
    names = list(columns)
    width = max(12, *(len(n) for n in names))
    header = f"{'task':14s}" + "".join(f"{n:>{width + 2}s}" for n in names)
    lines = [header, "-" * len(header)]
    for task in list(SNS_TASKS) + list(GENERAL_TASKS):
        row = f"{task:14s}"
        for n in names:
            row += f"{columns[n]['tasks'].get(task, float('nan')):>{width + 2}.3f}"
        lines.append(row)
    lines.append("-" * len(header))
    for key, label in (("sns_avg", "SNS avg"), ("general_avg", "General avg")):
        lines.append(f"{label:14s}" + "".join(f"{columns[n][key]:>{width + 2}.3f}" for n in names))
    if any("wall_s" in c for c in columns.values()):
        lines.append(f"{'wall s':14s}" + "".join(
            f"{columns[n]['wall_s']:>{width + 2}.0f}" if "wall_s" in columns[n]
            else f"{'-':>{width + 2}s}" for n in names))
    return "\n".join(lines)


def plot_results(columns: dict[str, dict[str, Any]], out: Path, pipeline_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = list(columns)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.2), 3.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [columns[n]["sns_avg"] for n in names], 0.4, label="SNS avg")
    ax.bar([i + 0.2 for i in x], [columns[n]["general_avg"] for n in names], 0.4, label="General avg")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("RedOne 2.0 pipeline vs baselines (tiny Qwen3, synthetic tasks)")
    fig.tight_layout()
    paths.append(out / "averages.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage in (1, 3):
        log = pipeline_dir / f"stage{stage}" / "metrics.jsonl"
        if log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if "accuracy" in r]
            ax.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], label=f"stage {stage}")
    ax.set_xlabel("DAPO step")
    ax.set_ylabel("rollout accuracy")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "dapo_accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def run_demo(demo: DemoConfig) -> dict[str, dict[str, Any]]:
    t_start = time.perf_counter()
    out = Path(demo.out)
    paths = write_suite(out / "data", demo.n_train, demo.n_eval, demo.seed)
    t0 = time.perf_counter()
    tok_dir, base_dir = build_base(demo, paths, out)
    logger.info("base model ready in %.0f s", time.perf_counter() - t0)
    cfg = pipeline_config(demo, paths, tok_dir, base_dir)
    save_config(cfg, cfg.run_dir)
    columns: dict[str, dict[str, Any]] = {"base": run_stage(cfg, 0)}
    t0 = time.perf_counter()
    for stage in (1, 2, 3):
        columns[f"stage {stage}"] = run_stage(cfg, stage)
    columns["stage 3"]["wall_s"] = time.perf_counter() - t0
    columns.update(run_baselines(demo, cfg, out))
    table = format_table(columns)
    cap = json.loads((Path(cfg.run_dir) / "stage1" / "capability_map.json").read_text())
    plots = plot_results(columns, out, Path(cfg.run_dir))
    summary = {name: {k: c[k] for k in ("tasks", "sns_avg", "general_avg", "wall_s") if k in c}
               for name, c in columns.items()}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "table.txt").write_text(table + "\n")
    print("\nRedOne 2.0 pipeline on synthetic SNS tasks (greedy scores, "
          f"{demo.n_eval} eval rows per task)\n")
    print(table)
    print(f"\nweak tasks after stage 1 (capability map): {', '.join(cap['weak']) or 'none'}")
    print("'wall s' under stage 3 is the whole pipeline (stages 1-3 with evaluations);")
    print(f"budgets: pipeline = {demo.stage1.steps} + {demo.stage3.steps} DAPO steps and "
          f"{demo.stage2.steps} SFT steps; SFT baselines = {demo.baseline_sft_steps} SFT steps; "
          f"SFT -> RL = {demo.stage2.steps} SFT + {demo.stage1.steps + demo.stage3.steps} DAPO steps")
    print(f"plots: {', '.join(str(p) for p in plots)}; capability map: "
          f"{Path(cfg.run_dir) / 'stage1' / 'capability_map.png'}")
    print(f"demo wall time {time.perf_counter() - t_start:.0f} s")
    return columns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, required=False)
    parser.add_argument("--out", help="output directory (default runs/llmpost-demo)")
    parser.add_argument("--rollout", choices=["hf", "vllm"],
                        help="rollout back-end of every DAPO stage and baseline (vllm: a vLLM "
                             "engine; make setup installs the CPU build)")


def run(args: argparse.Namespace) -> int:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("common").setLevel(logging.WARNING)
    demo = config_from_args(DemoConfig, args)
    if args.out:
        demo.out = args.out
    if getattr(args, "rollout", None):
        for rl in (demo.stage1, demo.stage3):
            rl.generation.backend = args.rollout
    run_demo(demo)
    return 0
