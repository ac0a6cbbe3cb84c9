"""Stage-1 DAPO with general data mixed in, through the projector, or left out (llmpost).

Per seed: the llmpost demo's synthetic SNS + general tasks and its tiny Qwen3 base
(pretrained here, cached under --out), then stage 1 DAPO from that base in three arms at
equal steps: `mix` (general prompts in the rollout pool, `dapo.general_fraction`),
`projector` (rollouts on SNS only, the layer-wise `subset` projector on general
references) and `target only` (SNS prompts, no general data). Every `--eval-every` steps
the SNS and general averages are measured (greedy, `--n-eval` rows per task); "general
holds" is the last evaluated step before general first falls more than `--drop` below
the base's. Writes study_llm.json / study_llm.md under --out.

    python tools/projector_study.py --track llm --out runs/projector_study_llm [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.regularizer import RegularizerConfig
from common.seed_summary import format_mean_std
from llmpost.config import DapoConfig, EvalConfig, GenerationConfig, ModelConfig, SftConfig
from llmpost.dapo_trainer import train_dapo
from llmpost.data import load_many
from llmpost.demo import DemoConfig, build_base
from llmpost.evaluate import eval_records, evaluate_tasks
from llmpost.policy import build_policy, untie_embeddings
from llmpost.rewards import default_registry
from llmpost.tasks import write_suite
from llmpost.tokenizer import load_tokenizer

ARMS = ("mix", "projector", "target only")


def arm_config(arm: str, args: argparse.Namespace) -> DapoConfig:
    cfg = DapoConfig(steps=args.steps, prompts_per_step=args.prompts, group_size=8, lr=args.lr,
                     general_fraction=0.3, max_extra_rounds=1, save_every=10**6,
                     generation=GenerationConfig(max_new_tokens=8))
    if arm == "target only":
        return replace(cfg, general_fraction=0.0)
    if arm == "projector":
        return replace(cfg, general_mode="projector", projector=RegularizerConfig(
            feasible="subset", granularity="layer", fraction=0.5, n_general=8, path="ghost"))
    return cfg


def run_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    root = Path(args.out) / f"seed{seed}"
    paths = write_suite(root / "data", n_train=args.n_train, n_eval=args.n_eval, seed=seed)
    demo = DemoConfig(seed=seed, pretrain=SftConfig(
        steps=args.pretrain_steps, batch_size=32, lr=2e-3, general_fraction=0.75,
        save_every=10**6))
    tok_dir, base_dir = build_base(demo, paths, root)
    tokenizer = load_tokenizer(tok_dir)
    registry = default_registry()
    sns, general = load_many([paths["sns_train"]]), load_many([paths["general_train"]])
    evalset = eval_records(load_many([paths["sns_eval"], paths["general_eval"]]), args.n_eval)
    eval_cfg = EvalConfig(per_task=args.n_eval, max_new_tokens=8)
    rows = []
    for arm in ARMS:
        model = untie_embeddings(build_policy(ModelConfig(), tokenizer, base_dir))

        def measure(model=model) -> dict[str, float]:
            result = evaluate_tasks(model, tokenizer, evalset, registry, eval_cfg)
            return {"sns": result["sns_avg"], "general": result["general_avg"]}

        start = time.perf_counter()
        curve = [{"step": 0, **measure()}]
        result = train_dapo(model, tokenizer, sns, general, arm_config(arm, args), registry,
                            root / arm.replace(" ", "_"), seed, model_path=base_dir,
                            validator=measure, validate_every=args.eval_every)
        curve += [{"step": h["step"], "sns": h["val/sns"], "general": h["val/general"]}
                  for h in result.history if "val/sns" in h]
        base_general = curve[0]["general"]
        holds = args.steps
        for prev, point in zip(curve, curve[1:]):
            if point["general"] < base_general - args.drop:
                holds = prev["step"]
                break
        rows.append({"seed": seed, "arm": arm, "sns": curve[-1]["sns"],
                     "general": curve[-1]["general"], "base_sns": curve[0]["sns"],
                     "base_general": base_general, "general_holds": holds, "curve": curve,
                     "wall_s": time.perf_counter() - start})
        print(f"seed {seed} {arm:12s} SNS {rows[-1]['sns']:.3f} general {rows[-1]['general']:.3f} "
              f"(base {curve[0]['sns']:.3f} / {base_general:.3f}) holds {holds} "
              f"[{rows[-1]['wall_s']:.0f} s]", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/projector_study_llm")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="high enough to threaten general")
    parser.add_argument("--eval-every", type=int, default=6)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--drop", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller base")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.pretrain_steps, args.prompts = 12, 4, 300, 8
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = [r for seed in range(args.seeds) for r in run_seed(seed, args)]
    lines = [f"Stage-1 DAPO, {args.steps} steps of {args.prompts} prompts x 8, lr {args.lr}, "
             f"base pretrained {args.pretrain_steps} steps; {args.seeds} seeds, mean ± sd; "
             f"eval {args.n_eval} rows per task; general holds = steps before general falls "
             f"{args.drop} below the base.", "",
             "| arm | SNS avg | general avg | general holds (steps) | base SNS / general |",
             "|---|---|---|---|---|"]
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} | {format_mean_std([r['sns'] for r in rs])} | "
                     f"{format_mean_std([r['general'] for r in rs])} | "
                     f"{format_mean_std([float(r['general_holds']) for r in rs])} | "
                     f"{format_mean_std([r['base_sns'] for r in rs])} / "
                     f"{format_mean_std([r['base_general'] for r in rs])} |")
    lines.append(f"\nwall time {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_llm.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "study_llm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
