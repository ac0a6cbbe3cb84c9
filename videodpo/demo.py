"""`videodpo demo`: the Reg-DPO paper's claims put to a test on the CPU, on generated data.

1. Make the synthetic world (one coloured shape moving by a captioned rule) and split
   its clips into base-training, pair and held-out parts.
2. Train a tiny Wan-style base model in pixel space (latent = pixel) with the ordinary
   flow-matching loss, on base-training clips whose captions are noisy: a share of them
   (`wrong_caption_share`, 0.4) name another direction than the clip moves in, as the
   captions of scraped video often do. That is the base's flaw, and it shows in its
   samples: asked for "left", it often moves the shape another way or barely at all.
   Measured (2-core CPU): the demo's base scores motion fidelity 0.17 ± 0.02 over 3
   seeds (0.25-0.28 on other held-out draws of seed 0), where real clips score 1, a
   still shape 0.14 and the same recipe on clean captions 0.98; per clip, about a third
   score above 0.45 and a third below 0.05. So the noisy captions both
   mislead and slow the learning of motion, more than the 0.6 a clean mixture of right
   and wrong directions would give. A flaw in the data was chosen over a base stopped
   partway because the base learns motion suddenly (between steps 600 and 1,200), so
   where a stopped run lands would hinge on the seed. GT-Pairs can fix it: their
   preferred clip always moves the captioned way.
3. From that base and the curated (correctly captioned) pair clips build
   - GT-Pairs: the real clip preferred, the base's generation for its first frame and
     caption rejected;
   - annotated pairs: two base generations per prompt, the one the motion-fidelity
     scorer ranks higher preferred (standing in for human labels).
4. Tune the same base four ways at the same steps, batch and learning rate: SFT on the
   real clips, Flow-DPO on GT-Pairs, Reg-DPO on GT-Pairs, Reg-DPO on annotated pairs.
5. Measure every arm: motion fidelity of sampled held-out clips (the primary metric:
   what a user sees), DPO accuracy on held-out GT-Pairs, error on the preferred pair
   clips and on held-out real clips, and a contact sheet per arm.

`--seeds N` repeats 2-5 with seeds 0..N-1 (a new world draw, base and sampling noise
each; the base is trained once per seed, cached, and shared by that seed's arms) and
reports mean ± std. At the end it prints which of the paper's claims held and by how
much, and writes `results.json` (`arms`: per arm and metric `mean`, `std`,
`n_seeds`; `claims`: `{claim, held, evidence}`). The table is whatever happened.

Why the world and base look the way they do (measured: every 16x16 variant left motion
fidelity at ~0.1, the level of a still shape):
- a patch of 2x2 pixels (12 numbers) in a 128-wide model: with 4x4 patches (48 numbers)
  in a 64-wide one, the residual stream is nearly full just carrying the noise that a
  flow model must give back, and even copying the given first frame is not learned;
- 8 heads: each head attends at one relative offset (Wan has only rotary positions),
  and the shift depends on the caption's direction;
- training sigmas shifted to high noise (`flow_shift` 5) and a constant learning rate:
  at low noise each frame shows its own shape and motion is never needed, so uniform
  sigmas starve the motion signal;
- image-to-video: the first frame fixes where the shape starts, so the base learns to
  move it, rather than to pick a place from the noise of each frame (text-to-video,
  `--task t2v`, scores 0.25 with the same budget).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from common.errors import ConfigError
from common.seed_summary import (
    Claim,
    compare_claim,
    format_claims,
    mean_std,
    results_payload,
    summarize_seeds,
)
from videodpo.annotated_pairs import annotate_pairs
from videodpo.config import RunConfig
from videodpo.data.manifest import write_manifest
from videodpo.data.motion import motion_fidelity
from videodpo.data.synthetic import WorldConfig, caption, miscaptioned, render_batch, sample_records
from videodpo.data.video_io import write_video
from videodpo.losses import dpo_accuracy_and_margin, preference_gap
from videodpo.models import load_adapter
from videodpo.models.tiny import build_pixel_adapter
from videodpo.trainer import train
from videodpo.validation import generate, motion_scores, sample_errors, write_contact_sheet

logger = logging.getLogger(__name__)
HELP = "noisy-caption base -> GT / annotated pairs -> SFT, DPO, Reg-DPO arms over seeds, claims"
# arm -> (loss kind, pairs it trains on)
ARMS: dict[str, tuple[str, str]] = {
    "sft": ("sft", "gt"),
    "dpo": ("dpo", "gt"),
    "reg_dpo": ("reg_dpo", "gt"),
    "reg_dpo_annotated": ("reg_dpo", "annotated"),
}
METHODS = tuple(ARMS)
METRICS = ("motion_fidelity", "dpo_accuracy", "chosen_error", "heldout_error")


@dataclass
class DemoConfig:
    world: WorldConfig = field(default_factory=lambda: WorldConfig(
        height=8, width=8, num_frames=4, shape_size=4, slow_step=1, fast_step=2, speeds=("fast",)))
    num_base_clips: int = 4096
    wrong_caption_share: float = 0.4  # the base's flaw: captions naming a wrong direction
    num_pair_clips: int = 64
    num_heldout_clips: int = 32
    base_steps: int = 1500
    base_lr: float = 3e-3
    flow_shift: float = 5.0  # training sigmas lean to high noise, where motion is decided
    tune_steps: int = 100
    tune_lr: float = 1e-4
    batch_size: int = 16
    pair_batch_size: int = 8
    beta: float = 500.0
    sft_weight: float = 1.0
    sample_steps: int = 16
    num_layers: int = 4
    num_heads: int = 8
    head_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    task: str = "i2v"  # the base also sees the real clip's first frame; or "t2v"
    seed: int = 0


def _items(chosen: torch.Tensor, rejected: torch.Tensor, captions: list[str]) -> list[dict]:
    return [{"chosen": c, "rejected": r, "caption": t} for c, r, t in zip(chosen, rejected, captions)]


def _run_cfg(out_dir: Path, kind: str, steps: int, lr: float, batch: int, demo: DemoConfig,
             min_lr_ratio: float = 0.1) -> RunConfig:
    cfg = RunConfig(out_dir=str(out_dir))
    cfg.loss.kind, cfg.loss.beta, cfg.loss.sft_weight = kind, demo.beta, demo.sft_weight
    cfg.model.flow_shift = demo.flow_shift
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio = lr, min(50, steps // 10), min_lr_ratio
    cfg.train.steps, cfg.train.batch_size, cfg.train.seed = steps, batch, demo.seed
    cfg.train.log_every = max(1, steps // 20)
    return cfg


def _base_key(demo: DemoConfig) -> dict:
    """Everything the base model depends on: a cached base is reused only if it matches."""
    keys = ("world", "num_base_clips", "wrong_caption_share", "base_steps", "base_lr", "flow_shift",
            "batch_size", "num_layers", "num_heads", "head_dim", "patch_size", "task", "seed")
    return _plain({k: v for k, v in asdict(demo).items() if k in keys})


def train_base(out: Path, demo: DemoConfig, clips: torch.Tensor, captions: list[str]) -> Path:
    """The base model trained on `clips` with (noisy) `captions`, or the cached one under
    `out` when it was trained with the same settings."""
    key_file, export = out / "base_key.json", out / "final"
    if key_file.exists() and (export / "transformer").is_dir() and json.loads(key_file.read_text()) == _base_key(demo):
        logger.info("reusing the cached base model in %s", export)
        return export
    w = demo.world
    logger.info("training the base model (%d steps)", demo.base_steps)
    adapter = build_pixel_adapter("wan", demo.task, seed=demo.seed, height=w.height, width=w.width,
                                  num_frames=w.num_frames, num_layers=demo.num_layers, num_heads=demo.num_heads,
                                  head_dim=demo.head_dim, ffn_dim=2 * demo.num_heads * demo.head_dim,
                                  patch_size=demo.patch_size)
    # A constant learning rate after warm-up: the base learns motion suddenly, after 600
    # to 1,200 steps, and a decaying rate delays that.
    cfg = _run_cfg(out, "sft", demo.base_steps, demo.base_lr, demo.batch_size, demo, min_lr_ratio=1.0)
    result = train(cfg, dataset=_items(clips, clips, captions), adapter=adapter)
    key_file.write_text(json.dumps(_base_key(demo)))
    return result.export_dir


def run_seed(out: Path, demo: DemoConfig) -> dict[str, dict[str, float]]:
    """One seed: base (cached), pairs, the four arms and their measurements under `out`.
    A seed finished with the same settings is read back from its `rows.json`."""
    out.mkdir(parents=True, exist_ok=True)
    done = out / "rows.json"
    if done.exists():
        saved = json.loads(done.read_text())
        if saved["config"] == _plain(asdict(demo)):
            logger.info("seed %d: reusing the finished run in %s", demo.seed, out)
            return saved["rows"]
    start = time.perf_counter()
    world = demo.world
    n_base, n_pair, n_held = demo.num_base_clips, demo.num_pair_clips, demo.num_heldout_clips
    records = sample_records(world, n_base + n_pair + n_held, demo.seed)
    pair_recs, held_recs = records[n_base:n_base + n_pair], records[n_base + n_pair:]
    clips = render_batch(records)
    base_clips, pair_clips, held_clips = clips[:n_base], clips[n_base:n_base + n_pair], clips[n_base + n_pair:]
    pair_caps, held_caps = [caption(r) for r in pair_recs], [caption(r) for r in held_recs]
    f, h, w = world.num_frames, world.height, world.width

    base_dir = train_base(out / "base", demo, base_clips,
                          miscaptioned(records[:n_base], demo.wrong_caption_share, demo.seed))
    base = load_adapter(base_dir)
    t_base = time.perf_counter() - start

    i2v = demo.task == "i2v"
    pair_first = pair_clips[:, :, 0] if i2v else None
    held_first = held_clips[:, :, 0] if i2v else None

    def base_generate(prompts: list[str], first: torch.Tensor | None, seed: int) -> torch.Tensor:
        return generate(base, base.transformer, prompts, f, h, w, first, num_steps=demo.sample_steps, seed=seed)

    # GT-Pairs: real clip over the base's generation. Annotated pairs: two more base
    # generations, ranked by the motion-fidelity scorer.
    pair_rejected = base_generate(pair_caps, pair_first, demo.seed + 1)
    held_rejected = base_generate(held_caps, held_first, demo.seed + 2)
    annotated = annotate_pairs(base_generate(pair_caps, pair_first, demo.seed + 4),
                               base_generate(pair_caps, pair_first, demo.seed + 5), pair_recs, motion_fidelity)
    _write_pairs(out / "pairs", pair_clips, pair_rejected, pair_caps, world.fps)
    _write_pairs(out / "annotated_pairs", annotated.chosen, annotated.rejected, pair_caps, world.fps)
    datasets = {"gt": _items(pair_clips, pair_rejected, pair_caps),
                "annotated": _items(annotated.chosen, annotated.rejected, pair_caps)}

    held_cond = base.prepare_conditions(held_caps, held_first, f)
    pair_cond = base.prepare_conditions(pair_caps, pair_first, f)
    ref_w = sample_errors(base, base.transformer, held_clips, held_cond)
    ref_l = sample_errors(base, base.transformer, held_rejected, held_cond)
    rows: dict[str, dict[str, float]] = {}
    samples: dict[str, torch.Tensor] = {"real": held_clips}

    def evaluate(name: str, adapter_, model) -> None:
        gen = generate(adapter_, model, held_caps, f, h, w, held_first, num_steps=demo.sample_steps,
                       seed=demo.seed + 3)
        samples[name] = gen
        held_w = sample_errors(adapter_, model, held_clips, held_cond)
        held_l = sample_errors(adapter_, model, held_rejected, held_cond)
        accuracy = dpo_accuracy_and_margin(preference_gap(held_w, held_l, ref_w, ref_l))[0]
        rows[name] = {
            "motion_fidelity": motion_scores(gen, held_recs),
            "dpo_accuracy": accuracy if name != "base" else float("nan"),
            "chosen_error": float(sample_errors(adapter_, model, pair_clips, pair_cond).mean()),
            "heldout_error": float(held_w.mean()),
        }

    evaluate("base", base, base.transformer)
    histories = {}
    for arm, (kind, pairs) in ARMS.items():
        logger.info("seed %d: tuning the base with %s on %s pairs (%d steps)", demo.seed, kind, pairs,
                    demo.tune_steps)
        tuned = load_adapter(base_dir)
        cfg = _run_cfg(out / arm, kind, demo.tune_steps, demo.tune_lr, demo.pair_batch_size, demo)
        result = train(cfg, dataset=datasets[pairs], adapter=tuned)
        histories[arm] = result.history
        evaluate(arm, tuned, tuned.transformer)
    rows["real clips"] = {"motion_fidelity": motion_scores(held_clips, held_recs), "dpo_accuracy": float("nan"),
                          "chosen_error": float("nan"), "heldout_error": float("nan")}
    rows["annotated pairs (chosen)"] = {
        "motion_fidelity": sum(annotated.chosen_scores) / n_pair, "dpo_accuracy": float("nan"),
        "chosen_error": float("nan"), "heldout_error": float("nan")}
    elapsed = time.perf_counter() - start

    n_show = min(8, n_held)
    for name, clips_ in samples.items():
        labels = [f"{r.direction}" for r in held_recs[:n_show]]
        write_contact_sheet(clips_[:n_show], out / "contact_sheets" / f"{name}.png", labels, scale=max(4, 64 // w))
    _plot_seed(rows, histories, out / "results.png")
    (out / "rows.json").write_text(json.dumps(
        {"rows": rows, "wall_time_s": elapsed, "base_time_s": t_base, "annotated_ties": annotated.num_ties,
         "config": _plain(asdict(demo))}, indent=2))
    print(f"seed {demo.seed}: wall time {elapsed:.0f} s (base model {t_base:.0f} s)")
    return rows


def claims_of(summary: dict) -> list[Claim]:
    """The Reg-DPO paper's claims, on the primary metric, plus what regularization is for."""
    fid = "motion_fidelity"
    return [
        compare_claim("Reg-DPO on GT-Pairs beats SFT on the real clips", summary, fid, "reg_dpo", "sft"),
        compare_claim("Reg-DPO on GT-Pairs beats plain Flow-DPO on GT-Pairs", summary, fid, "reg_dpo", "dpo"),
        compare_claim("GT-Pairs beat annotated pairs (Reg-DPO on each)", summary, fid, "reg_dpo",
                      "reg_dpo_annotated"),
        compare_claim("Reg-DPO improves the base's motion", summary, fid, "reg_dpo", "base"),
        compare_claim("Reg-DPO keeps held-out error on real clips below plain Flow-DPO's", summary,
                      "heldout_error", "reg_dpo", "dpo", higher_is_better=False),
    ]


def run_demo(out_dir: str | Path, demo: DemoConfig | None = None, num_seeds: int = 1) -> dict:
    """Every arm for seeds `demo.seed .. demo.seed + num_seeds - 1`; writes `results.json`,
    `table.md` and `results.png` under `out_dir` (and one folder per seed)."""
    demo = demo or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    per_seed = [run_seed(out / f"seed_{s}", replace(demo, seed=s))
                for s in range(demo.seed, demo.seed + num_seeds)]
    elapsed = time.perf_counter() - start
    summary = summarize_seeds(per_seed)
    claims = claims_of(summary)
    table = format_table(summary)
    report = "\n".join([
        f"Reg-DPO demo: {num_seeds} seed(s), mean ± std over seeds; base trained on captions "
        f"{demo.wrong_caption_share:.0%} of which name a wrong direction; every arm {demo.tune_steps} "
        f"steps of {demo.pair_batch_size} pairs at lr {demo.tune_lr:g}", "", table, "",
        "claims (motion fidelity of sampled held-out clips unless named):", format_claims(claims),
        f"wall time {elapsed:.0f} s for {num_seeds} seed(s); contact sheets: {out}/seed_*/contact_sheets/"])
    print("\n" + report)
    (out / "report.txt").write_text(report + "\n")
    (out / "table.md").write_text(table + "\n")
    payload = results_payload(summary, claims, n_seeds=num_seeds, wall_time_s=elapsed,
                              config=_plain(asdict(demo)))
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    _plot_summary(summary, out / "results.png")
    return {"arms": summary, "claims": claims, "per_seed": per_seed, "wall_time_s": elapsed, "out_dir": str(out)}


def _plain(value):
    return json.loads(json.dumps(value, default=list))


def _write_pairs(out_dir: Path, chosen: torch.Tensor, rejected: torch.Tensor, captions: list[str], fps: float) -> Path:
    rows = []
    for i, (c, r, text) in enumerate(zip(chosen, rejected, captions)):
        rows.append({"chosen": str(write_video(out_dir / f"real_{i:04d}.mp4", c, fps=fps)),
                     "rejected": str(write_video(out_dir / f"base_{i:04d}.mp4", r, fps=fps)),
                     "caption": text, "meta": {"generator": "demo base", "seed": i}})
    return write_manifest(out_dir / "pairs.jsonl", rows)


def format_table(summary: dict) -> str:
    head = "| arm | motion fidelity | DPO accuracy | chosen error | held-out error |"
    lines = [head, "|---|---|---|---|---|"]
    for name in summary:
        cells = [mean_std(summary, name, k) for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_seed(rows: dict, histories: dict, path: Path) -> None:
    import matplotlib  # lazy: plotting only, after training; keeps matplotlib off the import path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    names = [n for n in rows if n in ("base", *METHODS)]
    for ax, key in zip(axes[:2], ("motion_fidelity", "heldout_error")):
        ax.bar(names, [rows[n][key] for n in names], color="#4a7")
        ax.set_title(key.replace("_", " "))
        ax.tick_params(axis="x", labelrotation=20)
    for arm, hist in histories.items():
        axes[2].plot([r["step"] for r in hist], [r["sft"] for r in hist], label=arm)
    axes[2].set_title("error on preferred clips during tuning")
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_summary(summary: dict, path: Path) -> None:
    import matplotlib  # lazy: plotting only, after training; keeps matplotlib off the import path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    names = [n for n in ("base", *METHODS) if n in summary]
    for ax, key in zip(axes, ("motion_fidelity", "heldout_error")):
        ax.bar(names, [summary[n][key]["mean"] for n in names], yerr=[summary[n][key]["std"] for n in names],
               color="#4a7", capsize=4)
        ax.set_title(f"{key.replace('_', ' ')} (mean ± std over seeds)")
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/videodpo-demo", help="output directory")
    parser.add_argument("--base-steps", type=int, default=None, help="base model training steps")
    parser.add_argument("--tune-steps", type=int, default=None, help="steps of each tuning method")
    parser.add_argument("--task", choices=("t2v", "i2v"), default=None, help="base model task")
    parser.add_argument("--seeds", type=int, default=1, help="seeds to run every arm for (mean ± std)")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default 0)")


def run(args: argparse.Namespace) -> int:
    demo = DemoConfig()
    if args.base_steps is not None:
        demo = replace(demo, base_steps=args.base_steps)
    if args.tune_steps is not None:
        demo = replace(demo, tune_steps=args.tune_steps)
    if args.task is not None:
        demo = replace(demo, task=args.task)
    if args.seed is not None:
        demo = replace(demo, seed=args.seed)
    if args.seeds < 1:
        raise ConfigError(f"--seeds: at least 1 expected, got {args.seeds}")
    run_demo(args.out, demo, args.seeds)
    return 0
