"""`llmpost demo [--out DIR] [--seeds N]`: RedOne 2.0's claims put to a test on a CPU.

1. Synthetic SNS + general tasks (JSONL) with an out-of-distribution split for every
   task (prompt templates the training rows never use, `llmpost.tasks.TEMPLATES`), a
   word-level tokenizer, a tiny Qwen3 base pretrained on the general tasks with a little
   SNS data (cached per seed).
2. The three stages (DAPO -> diagnose -> targeted SFT -> DAPO) through `llmpost.pipeline`.
3. The paper's ablation baselines from the same base at a similar step budget: SFT on
   SNS data only, SFT with the general share mixed in, SFT then RL.
4. A data-budget axis: the pipeline and the SFT-centric baselines (SFT + general share,
   SFT -> RL) again on half the training rows (a prefix of the full set).
5. Every arm is scored in distribution and out of distribution; `--seeds N` repeats all
   of it for seeds 0..N-1 (new data draw, base and training noise each) and reports
   mean ± std; the rows each arm consumed and its wall time are stated.
At the end it prints which of the paper's claims held and by how much, and writes
`results.json` (`arms`: per arm and metric `mean`, `std`, `n_seeds`; `claims`:
`{claim, held, evidence}`). The tables report what happened, whatever it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import transformers

from common.config import add_config_args, config_from_args, save_config
from common.errors import ConfigError
from common.seed_summary import (
    Claim,
    compare_claim,
    format_claims,
    mean_of,
    mean_std,
    results_payload,
    summarize_seeds,
)
from llmpost.config import (
    DapoConfig,
    DataConfig,
    DiagnoseConfig,
    EvalConfig,
    GenerationConfig,
    ModelConfig,
    PipelineConfig,
    SftConfig,
)
from llmpost.dapo_trainer import train_dapo
from llmpost.data import load_many
from llmpost.evaluate import eval_records, evaluate_tasks
from llmpost.pipeline import model_dir, run_stage
from llmpost.policy import build_policy, save_policy
from llmpost.rewards import default_registry
from llmpost.sft import train_sft
from llmpost.tasks import GENERAL_TASKS, OOD_SPLIT, SNS_TASKS, vocabulary_words, write_suite
from llmpost.tokenizer import load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

HELP = "synthetic SNS + general tasks, tiny Qwen3: three stages vs baselines, OOD, half data, seeds"
HALF = " (half data)"


@dataclass
class DemoConfig:
    out: str = "runs/llmpost-demo"
    seed: int = 0
    n_train: int = 2000  # rows per task ("full data"); the half-data arms get the first half
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
                    base_dir: Path, run_dir: Path) -> PipelineConfig:
    return PipelineConfig(
        run_dir=str(run_dir), seed=demo.seed,
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


def baseline_plans(demo: DemoConfig) -> dict[str, list[tuple[str, Any]]]:
    """Name -> the (kind, config) stages of each SFT-centric baseline."""
    rl_steps = demo.stage1.steps + demo.stage3.steps
    sft_budget = replace(demo.stage2, steps=demo.baseline_sft_steps)
    return {
        "SFT (SNS only)": [("sft", replace(sft_budget, general_fraction=0.0))],
        sft_general_name(demo): [
            ("sft", replace(sft_budget, general_fraction=demo.baseline_general_fraction))],
        "SFT -> RL": [("sft", replace(demo.stage2, general_fraction=demo.baseline_general_fraction)),
                      ("rl", replace(demo.stage1, steps=rl_steps))],
    }


def sft_general_name(demo: DemoConfig) -> str:
    return f"SFT + {demo.baseline_general_fraction:.0%} general"


def run_baselines(demo: DemoConfig, cfg: PipelineConfig, out: Path, names: tuple[str, ...] | None = None,
                  suffix: str = "") -> dict[str, dict[str, Any]]:
    """SFT-only, SFT + general share, SFT then RL (those in `names`); each from the same
    base, on `cfg.data`'s training rows, scored in distribution and out of distribution."""
    registry = default_registry()
    sns, general = load_many(cfg.data.sns_train), load_many(cfg.data.general_train)
    evalset = eval_records(load_many(cfg.data.sns_eval + cfg.data.general_eval), demo.n_eval)
    oodset = ood_records(cfg, demo.n_eval)
    results = {}
    for i, (name, steps) in enumerate(baseline_plans(demo).items()):
        if names is not None and name not in names:
            continue
        run_dir = out / f"b{i}"
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
        result["ood"] = evaluate_tasks(model, tokenizer, oodset, registry, cfg.eval)
        result["wall_s"] = time.perf_counter() - t0
        result["rows_consumed"] = sum(_rows_consumed(run_dir / f"{j}_{kind}", kind, c)
                                      for j, (kind, c) in enumerate(steps))
        run_dir.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result, indent=2))
        results[name + suffix] = result
    return results


def ood_records(cfg: PipelineConfig, per_task: int) -> list:
    """The out-of-distribution eval rows next to `cfg`'s eval files (`*_ood.jsonl`)."""
    files = [f.replace("_eval.jsonl", f"_{OOD_SPLIT}.jsonl") for f in cfg.data.sns_eval + cfg.data.general_eval]
    return eval_records(load_many(files), per_task)


def _rows_consumed(stage_out: Path, kind: str, stage_cfg: Any) -> int:
    """Training rows a stage drew: SFT steps x batch; DAPO prompts over every sampling round
    (each answered `group_size` times), read from its metrics log."""
    if kind == "sft":
        return stage_cfg.steps * stage_cfg.batch_size
    log = stage_out / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    rounds = sum(r.get("sampling_rounds", 1) for r in rows if "step" in r and "accuracy" in r)
    return int(rounds * stage_cfg.prompts_per_step)


def pipeline_rows_consumed(cfg: PipelineConfig) -> int:
    run_dir = Path(cfg.run_dir)
    return (_rows_consumed(run_dir / "stage1", "rl", cfg.stage1) + _rows_consumed(run_dir / "stage2", "sft", cfg.stage2)
            + _rows_consumed(run_dir / "stage3", "rl", cfg.stage3))


def evaluate_ood(cfg: PipelineConfig, stage: int, per_task: int) -> dict[str, Any]:
    """A pipeline stage's model scored on the out-of-distribution rows (cached)."""
    path = Path(cfg.run_dir) / ("base" if stage == 0 else f"stage{stage}") / "eval_ood.json"
    if path.exists():
        return json.loads(path.read_text())
    registry = default_registry()
    tokenizer = load_tokenizer(model_dir(cfg, stage))
    model = build_policy(cfg.model, tokenizer, model_dir(cfg, stage))
    result = evaluate_tasks(model, tokenizer, ood_records(cfg, per_task), registry, cfg.eval)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


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
    import matplotlib  # lazy: plotting only, after training; keeps matplotlib off the import path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

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


def _flat(column: dict[str, Any]) -> dict[str, float]:
    """One arm's numbers for the seed summary: averages, per-task scores (`id/…`, `ood/…`),
    rows consumed and wall time."""
    nan = float("nan")
    ood = column.get("ood") or {}
    out = {"sns_avg": column["sns_avg"], "general_avg": column["general_avg"],
           "ood_sns_avg": ood.get("sns_avg", nan), "ood_general_avg": ood.get("general_avg", nan),
           "rows_consumed": column.get("rows_consumed", nan), "wall_s": column.get("wall_s", nan)}
    out.update({f"id/{t}": v for t, v in column["tasks"].items()})
    out.update({f"ood/{t}": v for t, v in ood.get("tasks", {}).items()})
    return {k: (nan if v is None else float(v)) for k, v in out.items()}


def run_seed(demo: DemoConfig, out: Path) -> dict[str, dict[str, Any]]:
    """Every arm for `demo.seed` under `out` (finished seeds are read back)."""
    done = out / "columns.json"
    if done.exists():
        return json.loads(done.read_text())
    t_start = time.perf_counter()
    paths = write_suite(out / "data", demo.n_train, demo.n_eval, demo.seed)
    # the same generator and seed: the half set is the first half of every task's rows
    half_paths = write_suite(out / "data_half", demo.n_train // 2, demo.n_eval, demo.seed)
    half_paths = {**half_paths, **{k: v for k, v in paths.items() if not k.endswith("_train")}}
    t0 = time.perf_counter()
    tok_dir, base_dir = build_base(demo, paths, out)
    logger.info("seed %d: base model ready in %.0f s", demo.seed, time.perf_counter() - t0)
    columns: dict[str, dict[str, Any]] = {}
    for suffix, data_paths in (("", paths), (HALF, half_paths)):
        cfg = pipeline_config(demo, data_paths, tok_dir, base_dir, out / ("pipeline" + ("_half" if suffix else "")))
        save_config(cfg, cfg.run_dir)
        if not suffix:
            columns["base"] = run_stage(cfg, 0)
            columns["base"]["ood"] = evaluate_ood(cfg, 0, demo.n_eval)
        t0 = time.perf_counter()
        for stage in (1, 2, 3):
            result = run_stage(cfg, stage)
            if not suffix or stage == 3:
                result["ood"] = evaluate_ood(cfg, stage, demo.n_eval)
                columns[f"stage {stage}{suffix}"] = result
        final = columns[f"stage 3{suffix}"]
        final["wall_s"] = time.perf_counter() - t0
        final["rows_consumed"] = pipeline_rows_consumed(cfg)
        names = None if not suffix else (sft_general_name(demo), "SFT -> RL")
        columns.update(run_baselines(demo, cfg, out / ("baselines" + ("_half" if suffix else "")), names, suffix))
    columns = {name: {k: c[k] for k in ("tasks", "sns_avg", "general_avg", "ood", "wall_s", "rows_consumed")
                      if k in c} for name, c in columns.items()}
    for c in columns.values():
        if "ood" in c:
            c["ood"] = {k: c["ood"][k] for k in ("tasks", "sns_avg", "general_avg")}
    (out / "table.txt").write_text(format_table(columns) + "\n")
    plot_results(columns, out, out / "pipeline")
    done.write_text(json.dumps(columns, indent=2))
    logger.info("seed %d done in %.0f s", demo.seed, time.perf_counter() - t_start)
    return columns


def claims_of(demo: DemoConfig, summary: dict) -> list[Claim]:
    """RedOne 2.0's claims: no seesaw, better than SFT-centric training, less than half the
    data, holds up out of distribution."""
    sft_general = sft_general_name(demo)
    base_general, final_general = mean_of(summary, "base", "general_avg"), mean_of(summary, "stage 3", "general_avg")
    sns_only_general = mean_of(summary, "SFT (SNS only)", "general_avg")
    drop = final_general - base_general
    seesaw = Claim(
        claim="the RL-first pipeline avoids the seesaw: general average within 0.05 of the base's after stage 3",
        held=bool(drop > -0.05),
        evidence=(f"general avg: base {mean_std(summary, 'base', 'general_avg')}, stage 3 "
                  f"{mean_std(summary, 'stage 3', 'general_avg')} (change {drop:+.3f}); SFT (SNS only) "
                  f"{mean_std(summary, 'SFT (SNS only)', 'general_avg')} (change {sns_only_general - base_general:+.3f})"))
    return [
        seesaw,
        compare_claim(f"the three stages beat {sft_general} on the SNS tasks", summary, "sns_avg",
                      "stage 3", sft_general, label="SNS avg"),
        compare_claim("the three stages beat SFT -> RL on the SNS tasks", summary, "sns_avg", "stage 3",
                      "SFT -> RL", label="SNS avg"),
        compare_claim(f"the three stages on half the data match {sft_general} on all of it (SNS avg, "
                      "within 0.02)", summary, "sns_avg", "stage 3" + HALF, sft_general, tolerance=0.02,
                      label="SNS avg"),
        compare_claim(f"the three stages hold up out of distribution better than {sft_general} (OOD SNS avg)",
                      summary, "ood_sns_avg", "stage 3", sft_general, label="OOD SNS avg"),
        compare_claim("the three stages hold up out of distribution better than SFT -> RL (OOD SNS avg)",
                      summary, "ood_sns_avg", "stage 3", "SFT -> RL", label="OOD SNS avg"),
    ]


def format_summary(summary: dict) -> str:
    """Arms x (in-distribution and OOD averages, rows consumed, wall time), mean ± std."""
    cols = (("sns_avg", "SNS avg"), ("general_avg", "general avg"), ("ood_sns_avg", "OOD SNS avg"),
            ("ood_general_avg", "OOD general avg"))
    lines = ["| arm | " + " | ".join(label for _, label in cols) + " | rows consumed | wall s |",
             "|---|" + "---|" * (len(cols) + 2)]
    for arm, metrics in summary.items():
        cells = [mean_std(summary, arm, key) for key, _ in cols]
        rows = metrics.get("rows_consumed", {})
        wall = metrics.get("wall_s", {})
        cells.append(f"{rows['mean']:.0f}" if rows.get("n_seeds") else "-")
        cells.append(f"{wall['mean']:.0f}" if wall.get("n_seeds") else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(demo: DemoConfig, num_seeds: int = 1) -> dict[str, Any]:
    """Every arm for seeds `demo.seed .. demo.seed + num_seeds - 1` (one folder each under
    `demo.out`); prints the tables and claims and writes `results.json`."""
    t_start = time.perf_counter()
    out = Path(demo.out)
    per_seed = []
    for seed in range(demo.seed, demo.seed + num_seeds):
        per_seed.append(run_seed(replace(demo, seed=seed), out / f"seed_{seed}"))
    summary = summarize_seeds([{arm: _flat(c) for arm, c in cols.items()} for cols in per_seed])
    claims = claims_of(demo, summary)
    table = format_summary(summary)
    elapsed = time.perf_counter() - t_start
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results_payload(
        summary, claims, n_seeds=num_seeds, wall_time_s=elapsed, n_train_full=demo.n_train,
        n_train_half=demo.n_train // 2, n_eval_per_task=demo.n_eval), indent=2))
    first = out / f"seed_{demo.seed}"
    cap = json.loads((first / "pipeline" / "stage1" / "capability_map.json").read_text())
    lines: list[str] = []
    lines.append(f"\nRedOne 2.0 pipeline on synthetic SNS tasks, seed {demo.seed} per task (greedy scores, "
                 f"{demo.n_eval} eval rows per task; full data {demo.n_train} training rows per task)\n")
    lines.append(format_table(per_seed[0]))
    lines.append(f"\nweak tasks after stage 1 (capability map): {', '.join(cap['weak']) or 'none'}")
    lines.append(f"\nall arms, mean ± std over {num_seeds} seed(s); OOD = prompt wording never in training; "
                 f"half data = {demo.n_train // 2} rows per task\n")
    lines.append(table)
    r = demo.stage1.prompts_per_step
    lines.append(f"\nbudgets (equal compute is stated, not forced): pipeline = {demo.stage1.steps} + {demo.stage3.steps} "
                 f"DAPO steps of {r} prompts x {demo.stage1.group_size} samples and {demo.stage2.steps} SFT steps "
                 f"of {demo.stage2.batch_size} rows; SFT baselines = {demo.baseline_sft_steps} SFT steps of "
                 f"{demo.stage2.batch_size} rows; SFT -> RL = {demo.stage2.steps} SFT + "
                 f"{demo.stage1.steps + demo.stage3.steps} DAPO steps. 'rows consumed' counts SFT rows and DAPO "
                 "prompts drawn (every sampling round); 'wall s' is each arm's training and evaluation time.")
    lines.append("\nclaims:\n" + format_claims(claims))
    lines.append(f"\nplots: {first / 'averages.png'}, {first / 'dapo_accuracy.png'}; capability map: "
                 f"{first / 'pipeline' / 'stage1' / 'capability_map.png'}")
    lines.append(f"demo wall time {elapsed:.0f} s")
    report = "\n".join(lines)
    print(report)
    (out / "report.txt").write_text(report + "\n")
    return {"arms": summary, "claims": claims, "per_seed": per_seed, "wall_time_s": elapsed}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, required=False)
    parser.add_argument("--out", help="output directory (default runs/llmpost-demo)")
    parser.add_argument("--rollout", choices=["hf", "vllm"],
                        help="rollout back-end of every DAPO stage and baseline (vllm: a vLLM "
                             "engine; make setup installs the CPU build)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds to run every arm for (mean ± std)")


def run(args: argparse.Namespace) -> int:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("common").setLevel(logging.WARNING)
    demo = config_from_args(DemoConfig, args)
    if args.out:
        demo.out = args.out
    if getattr(args, "rollout", None):
        for rl in (demo.stage1, demo.stage3):
            rl.generation.backend = args.rollout
    if args.seeds < 1:
        raise ConfigError(f"--seeds: at least 1 expected, got {args.seeds}")
    run_demo(demo, args.seeds)
    return 0
