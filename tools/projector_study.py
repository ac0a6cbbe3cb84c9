"""What the data-regularization projector is for, on a toy with scarce target data.

A small MLP learns a target regression task from only `--target-samples` noisy examples,
while general data from a related task (same inputs, a slightly different function) are
plentiful. Each method trains from the same initialisation with the same target batches:
`none` (target only), `mean` (general only), and the projector with `subset` (layer-wise
and whole-model), `halfspace` and `hull` (layer-wise). Held-out target and general
losses are logged through training; the tool writes `study.json`, `study.md` (final and
best held-out target loss, how much it rose from its best, general loss) and
`study.png` (curves), whatever the numbers turn out to be.

    python tools/projector_study.py --out runs/projector_study [--seeds 5] [--steps 400]

`--track llm` (tools/projector_study_llm.py: stage-1 DAPO mix / projector / target only)
and `--track video` (tools/projector_study_video.py: Reg-DPO with general clips mixed /
projected / none) run the trainers' studies; `--track toy` (the default) is the above.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.regularizer import DataRegularizer, RegularizerConfig  # noqa: E402

METHODS = {
    "none (target only)": dict(feasible="none"),
    "mean (general only)": dict(feasible="mean"),
    "subset, layer-wise": dict(feasible="subset", granularity="layer", fraction=0.5),
    "subset, whole model": dict(feasible="subset", granularity="model", fraction=0.5),
    "halfspace, layer-wise": dict(feasible="halfspace", granularity="layer"),
    "hull, layer-wise": dict(feasible="hull", granularity="layer"),
}


@dataclass
class Toy:
    """Teacher functions: general f_G, and target f_T = f_G + a smooth shift."""

    dim: int
    shift: float
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor

    @classmethod
    def make(cls, dim: int, shift: float, seed: int) -> Toy:
        gen = torch.Generator().manual_seed(1000 + seed)
        vec = lambda: torch.randn(dim, generator=gen) / math.sqrt(dim)  # noqa: E731
        return cls(dim, shift, vec(), vec(), 2 * vec())

    def general(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(2 * x @ self.a) + x @ self.b

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.general(x) + self.shift * torch.tanh(x @ self.c)

    def sample(self, which: str, count: int, noise: float, gen: torch.Generator):
        x = torch.randn(count, self.dim, generator=gen)
        y = (self.target if which == "target" else self.general)(x)
        return x, y + noise * torch.randn(count, generator=gen)


def mlp(dim: int, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )


def per_sample_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x).squeeze(-1) - y) ** 2


def run_method(name: str, seed: int, args: argparse.Namespace) -> dict:
    toy = Toy.make(args.dim, args.shift, seed)
    data_gen = torch.Generator().manual_seed(seed)
    target_train = toy.sample("target", args.target_samples, args.target_noise, data_gen)
    target_eval = toy.sample("target", 2048, 0.0, data_gen)
    general_eval = toy.sample("general", 2048, 0.0, data_gen)
    model = mlp(args.dim, args.width, seed)
    cfg = RegularizerConfig(n_general=args.n_general, path="ghost", **METHODS[name])
    reg = DataRegularizer(model, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    batch_gen = torch.Generator().manual_seed(10_000 + seed)  # same batches for every method
    curve = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            with torch.no_grad():
                curve.append(dict(
                    step=step,
                    target=per_sample_loss(model, target_eval).mean().item(),
                    general=per_sample_loss(model, general_eval).mean().item(),
                ))
        if step == args.steps:
            break
        pick = torch.randperm(args.target_samples, generator=batch_gen)[: args.target_batch]
        target_batch = (target_train[0][pick], target_train[1][pick])
        general_batch = toy.sample("general", args.n_general, args.general_noise, batch_gen)
        opt.zero_grad(set_to_none=True)
        reg.step(per_sample_loss, target_batch, general_batch)
        opt.step()
    best = min(curve, key=lambda r: r["target"])
    return dict(
        method=name, seed=seed, curve=curve, final_target=curve[-1]["target"],
        best_target=best["target"], best_step=best["step"],
        rise_from_best=curve[-1]["target"] - best["target"], final_general=curve[-1]["general"],
    )


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for name in METHODS:
        runs = [r for r in results if r["method"] == name]
        row = {"method": name}
        for key in ("final_target", "best_target", "rise_from_best", "final_general"):
            values = [r[key] for r in runs]
            row[key] = statistics.mean(values)
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def write_outputs(results: list[dict], rows: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"args": vars(args), "summary": rows, "runs": results}))
    lines = [
        f"Toy: {args.target_samples} noisy target samples (noise {args.target_noise}), general "
        f"stream (n = {args.n_general} a step), target = general + {args.shift} tanh(c.x), MLP width {args.width}, Adam lr {args.lr}, "
        f"{args.steps} steps, mean +- sd over {args.seeds} seeds. Losses are held-out MSE.",
        "",
        "| method | final target loss | best target loss | rise from best | final general loss |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['final_target']:.3f} +- {r['final_target_sd']:.3f} | "
            f"{r['best_target']:.3f} | {r['rise_from_best']:.3f} +- {r['rise_from_best_sd']:.3f} | "
            f"{r['final_general']:.3f} +- {r['final_general_sd']:.3f} |"
        )
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in METHODS:
        runs = [r for r in results if r["method"] == name]
        steps = [p["step"] for p in runs[0]["curve"]]
        for ax, key in zip(axes, ("target", "general")):
            mean = [statistics.mean(r["curve"][i][key] for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, label=name)
    for ax, key in zip(axes, ("target", "general")):
        ax.set_title(f"held-out {key} loss (mean over seeds)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--track" in argv:  # llm / video: the trainers' studies, in their own modules
        i = argv.index("--track")
        track, rest = argv[i + 1], argv[:i] + argv[i + 2:]
        if track == "llm":
            from tools.projector_study_llm import main as track_main
        elif track == "video":
            from tools.projector_study_video import main as track_main
        elif track == "toy":
            return main(rest)
        else:
            raise SystemExit(f"--track: expected toy, llm or video, got {track!r}")
        return track_main(rest)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/projector_study")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--target-samples", type=int, default=16)
    parser.add_argument("--target-batch", type=int, default=8)
    parser.add_argument("--target-noise", type=float, default=0.5)
    parser.add_argument("--shift", type=float, default=1.5, help="size of f_T - f_G")
    parser.add_argument("--general-noise", type=float, default=0.1)
    parser.add_argument("--n-general", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for seed in range(args.seeds):
        for name in METHODS:
            results.append(run_method(name, seed, args))
            print(f"seed {seed} {name:22s} final target {results[-1]['final_target']:.3f} "
                  f"best {results[-1]['best_target']:.3f} general {results[-1]['final_general']:.3f}",
                  flush=True)
    write_outputs(results, summarize(results), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
