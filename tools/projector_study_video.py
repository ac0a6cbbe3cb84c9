"""Reg-DPO with general clips mixed in, projected, or left out (videodpo).

Per seed, on the videodpo demo's synthetic world (T2V, pixel space): the demo's base
model (trained here on miscaptioned clips, cached under --out), GT-Pairs (real clip over
the base's generation), and a pool of general clips (real clips with correct captions,
no pairs). Three arms tune the base with Reg-DPO for the same steps: `none`, `mixed`
(`regularizer.mode: mix`, the general clips' SFT error added with weight 1) and
`projected` (`regularizer.mode: projector`, layer-wise `subset`). Reported: held-out
error (`videodpo.validation.sample_errors`, fixed noise and timesteps) on general clips
(forgetting) and on held-out preferred clips, before and after. Writes
study_video.json / study_video.md under --out.

    python tools/projector_study.py --track video --out runs/projector_study_video [--quick]
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
from videodpo.data.synthetic import caption, miscaptioned, render_batch, sample_records
from videodpo.demo import DemoConfig, _items, _run_cfg, train_base
from videodpo.models import load_adapter
from videodpo.regularized_step import GeneralClips
from videodpo.trainer import train
from videodpo.validation import generate, sample_errors

ARMS = ("none", "mixed", "projected")


def run_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    root = Path(args.out) / f"seed{seed}"
    demo = DemoConfig(seed=seed, task="t2v", num_base_clips=args.base_clips,
                      base_steps=args.base_steps, tune_steps=args.steps, num_layers=2)
    world = demo.world
    n_base, n_pair, n_gen, n_held = args.base_clips, args.pairs, args.general, args.heldout
    records = sample_records(world, n_base + n_pair + n_gen + 2 * n_held, seed)
    clips = render_batch(records)
    cut = [n_base, n_base + n_pair, n_base + n_pair + n_gen, n_base + n_pair + n_gen + n_held]
    pair_recs, gen_recs = records[cut[0]:cut[1]], records[cut[1]:cut[2]]
    held_gen_recs, held_pref_recs = records[cut[2]:cut[3]], records[cut[3]:]
    pair_clips, gen_clips = clips[cut[0]:cut[1]], clips[cut[1]:cut[2]]
    held_gen, held_pref = clips[cut[2]:cut[3]], clips[cut[3]:]
    f, h, w = world.num_frames, world.height, world.width
    base_dir = train_base(root / "base", demo, clips[:n_base],
                          miscaptioned(records[:n_base], demo.wrong_caption_share, seed))
    base = load_adapter(base_dir)
    pair_caps = [caption(r) for r in pair_recs]
    rejected = generate(base, base.transformer, pair_caps, f, h, w, None,
                        num_steps=demo.sample_steps, seed=seed + 1)
    pairs = _items(pair_clips, rejected, pair_caps)
    gen_text = base.encode_prompts([caption(r) for r in gen_recs])
    general = GeneralClips([{"clip": c, "text": t} for c, t in
                            zip(base.encode_video(gen_clips), gen_text)],
                           "synthetic general clips")
    held_gen_cond = base.prepare_conditions([caption(r) for r in held_gen_recs], None, f)
    held_pref_cond = base.prepare_conditions([caption(r) for r in held_pref_recs], None, f)

    def errors(adapter) -> tuple[float, float]:
        model = adapter.transformer
        return (float(sample_errors(adapter, model, held_gen, held_gen_cond).mean()),
                float(sample_errors(adapter, model, held_pref, held_pref_cond).mean()))

    base_gen, base_pref = errors(base)
    rows = []
    for arm in ARMS:
        start = time.perf_counter()
        tuned = load_adapter(base_dir)
        cfg = _run_cfg(root / arm, "reg_dpo", args.steps, demo.tune_lr, demo.pair_batch_size, demo)
        if arm != "none":
            cfg.regularizer = replace(
                cfg.regularizer, mode="mix" if arm == "mixed" else "projector",
                general_cache="in-memory", projector=RegularizerConfig(
                    feasible="subset", granularity="layer", fraction=0.5,
                    n_general=args.n_general, path="ghost"))
        train(cfg, dataset=pairs, adapter=tuned, general_clips=general)
        gen_err, pref_err = errors(tuned)
        rows.append({"seed": seed, "arm": arm, "general_error": gen_err, "preferred_error": pref_err,
                     "base_general_error": base_gen, "base_preferred_error": base_pref,
                     "wall_s": time.perf_counter() - start})
        print(f"seed {seed} {arm:9s} held-out general {gen_err:.4f} (base {base_gen:.4f}) "
              f"preferred {pref_err:.4f} (base {base_pref:.4f}) [{rows[-1]['wall_s']:.0f} s]",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/projector_study_video")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="Reg-DPO steps per arm")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--base-clips", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--general", type=int, default=256, help="general clip pool")
    parser.add_argument("--n-general", type=int, default=8, help="general clips per step")
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller base")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.base_steps, args.base_clips = 40, 300, 512
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = [r for seed in range(args.seeds) for r in run_seed(seed, args)]
    lines = [f"Reg-DPO on GT-Pairs, {args.steps} steps per arm, base {args.base_steps} steps; "
             f"{args.seeds} seeds, mean ± sd; held-out error = mean flow-matching error at 4 "
             f"fixed timesteps ({args.heldout} clips each).", "",
             "| arm | held-out general error | held-out preferred error |", "|---|---|---|",
             f"| base | {format_mean_std([r['base_general_error'] for r in rows if r['arm'] == 'none'], 4)} | "
             f"{format_mean_std([r['base_preferred_error'] for r in rows if r['arm'] == 'none'], 4)} |"]
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} | {format_mean_std([r['general_error'] for r in rs], 4)} | "
                     f"{format_mean_std([r['preferred_error'] for r in rs], 4)} |")
    lines.append(f"\nwall time {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_video.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "study_video.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
