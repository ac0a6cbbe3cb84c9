"""Step time and peak memory of the DataRegularizer paths against plain steps.

Cases (`--cases`): `sft`, the SFT loss on a Qwen3 (below); `dapo`, the DAPO projector step
against a plain DAPO update on the same rollout batch; `regdpo`, the Reg-DPO projector step
against a plain Reg-DPO step on the tiny Wan; `video-tokens`, the ghost path's choices
(ghost_pairs auto / ghost, sketch) on Wan at growing video token counts. Ratios are medians
over `--repeats` alternating runs (use >= 5).

For a tiny Qwen3 and a ~50M-parameter Qwen3 on the CPU, and n general samples per step,
each path (materialized, ghost, sketch; layer granularity, plus ghost with model
granularity) is timed against a plain SFT step on the same target + general tokens.
Steps are interleaved (plain, then each path, per repetition) so that load from other
processes hits them alike; ratios are medians over repetitions. Writes
`bench.json`, `bench.md` and `bench.png` under --out.

    python tools/projector_bench.py --out runs/projector_bench [--models tiny,50m] [--n 4,8,16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.metrics import current_memory_mb, peak_memory_mb, reset_peak_memory  # noqa: E402
from common.regularizer import DataRegularizer, RegularizerConfig  # noqa: E402

MODELS = {
    # the tiny Qwen3
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # about 50M parameters (untied embeddings)
    "50m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64),
}
PATHS = {
    "materialized": dict(path="materialized", granularity="layer"),
    "ghost": dict(path="ghost", granularity="layer"),
    "ghost-model": dict(path="ghost", granularity="model"),
    "sketch": dict(path="sketch", granularity="layer", sketch_dim=64, sketch_min_numel=1 << 18),
}


def build_model(name: str) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(**MODELS[name], tie_word_embeddings=False, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(cfg)


def per_sample_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def measure(step) -> tuple[float, float]:
    """(seconds, peak MiB above the memory in use before the step) of one call."""
    reset_peak_memory()
    before = current_memory_mb()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return seconds, peak_memory_mb() - before


def bench_model(name: str, ns: list[int], args: argparse.Namespace) -> list[dict]:
    model = build_model(name)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = MODELS[name]["vocab_size"]
    rows = []
    for n in ns:
        gen = torch.Generator().manual_seed(n)
        target = torch.randint(0, vocab, (args.target_batch, args.seq), generator=gen)
        general = torch.randint(0, vocab, (n, args.seq), generator=gen)

        def plain(target=target, general=general):
            model.zero_grad(set_to_none=True)
            per_sample_loss(model, torch.cat([target, general])).mean().backward()

        steps = {"plain": plain}
        skipped = {}
        for path, kw in PATHS.items():
            if path not in args.paths:
                continue
            per_sample_gb = (n + args.target_batch) * n_params * 4 / 2**30
            if path == "materialized" and per_sample_gb > args.materialized_max_gb:
                skipped[path] = f"needs ~{per_sample_gb:.1f} GiB of per-sample gradients"
                continue
            cfg = RegularizerConfig(feasible="subset", fraction=0.5, n_general=n, **kw)
            reg = DataRegularizer(model, cfg)

            def run(reg=reg, target=target, general=general):
                model.zero_grad(set_to_none=True)
                reg.step(per_sample_loss, target, general)

            steps[path] = run
        times = {k: [] for k in steps}
        mems = {k: [] for k in steps}
        for fn in steps.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for k, fn in steps.items():
                sec, mem = measure(fn)
                times[k].append(sec)
                mems[k].append(mem)
        for k in steps:
            ratios = [t / p for t, p in zip(times[k], times["plain"])]
            rows.append(dict(
                model=name, params=n_params, n=n, target_batch=args.target_batch, seq=args.seq,
                path=k, seconds=statistics.median(times[k]), peak_mib=max(mems[k]),
                time_ratio=statistics.median(ratios),
                mem_ratio=max(mems[k]) / max(max(mems["plain"]), 1e-9),
            ))
            print(f"{name:5s} n={n:2d} {k:13s} {rows[-1]['seconds']:.3f}s "
                  f"x{rows[-1]['time_ratio']:.2f}  peak +{rows[-1]['peak_mib']:.0f} MiB", flush=True)
        for k, why in skipped.items():
            rows.append(dict(model=name, params=n_params, n=n, path=k, skipped=why))
    return rows


def alternate(steps: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each step, run in turn `repeats` times after one warm-up each."""
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


def ratio_rows(case: str, n: int, times: dict[str, list[float]], base: str, **extra) -> list[dict]:
    rows = []
    for k, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        rows.append(dict(model=case, n=n, path=k, seconds=statistics.median(ts),
                         time_ratio=statistics.median(ratios), peak_mib=0.0, mem_ratio=1.0,
                         repeats=len(ts), **extra))
        print(f"{case:12s} n={n:2d} {k:22s} {rows[-1]['seconds']:.3f}s x{rows[-1]['time_ratio']:.2f}",
              flush=True)
    return rows


def bench_dapo(n: int, args: argparse.Namespace) -> list[dict]:
    """The DAPO projector step (ghost, layer-wise subset) against a plain DAPO update on the
    same rollout batch (llmpost.dapo_trainer.dapo_update), tiny Qwen3 of the demo's size."""
    import random

    from llmpost.config import DapoConfig
    from llmpost.dapo_regularized import DapoSampleLoss, target_batch
    from llmpost.dapo_trainer import PolicyBatch, dapo_update
    from llmpost.model import tiny_qwen3
    from llmpost.policy import untie_embeddings

    vocab = 256
    model = untie_embeddings(tiny_qwen3(vocab, hidden_size=128, num_layers=2, num_heads=4,
                                        num_kv_heads=2, intermediate_size=256))
    rng = random.Random(0)
    b = args.dapo_batch
    prompts = [[rng.randrange(2, vocab) for _ in range(12)] for _ in range(b)]
    responses = [[rng.randrange(2, vocab) for _ in range(rng.randint(4, 16))] for _ in range(b)]
    old = [[-3.0 + rng.random() for _ in r] for r in responses]
    batch = PolicyBatch(prompts, responses, old, torch.randn(b), ["t"] * b)
    ids = torch.randint(2, vocab, (n, 24))
    labels = ids.clone()
    labels[:, :12] = -100
    general = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    cfg = DapoConfig(grad_clip=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg = DataRegularizer(model, RegularizerConfig(feasible="subset", n_general=n, path="ghost"))
    loss_fn = DapoSampleLoss(cfg)

    def projector():
        opt.zero_grad(set_to_none=True)
        reg.step(loss_fn, target_batch(batch, 0), general)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def plain_with_general():  # the same forwards and backwards, one mixed loss
        opt.zero_grad(set_to_none=True)
        (loss_fn(model, target_batch(batch, 0)).mean() + loss_fn(model, general).mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    times = alternate({"plain DAPO update": lambda: dapo_update(model, opt, batch, cfg, 0),
                       "plain + general NLL": plain_with_general,
                       "projector (ghost)": projector}, args.repeats)
    return ratio_rows("dapo", n, times, "plain DAPO update", target_batch=b)


def _wan_state(n: int, frames: int, size: int, path: str, ghost_pairs: str, mode: str):
    from videodpo.config import RunConfig
    from videodpo.models.tiny import build_pixel_adapter
    from videodpo.state import build_training_state

    cfg = RunConfig(out_dir="/tmp/unused")
    cfg.optim.lr = 1e-5
    cfg.regularizer.mode, cfg.regularizer.general_cache = mode, "in-memory"
    cfg.regularizer.projector = RegularizerConfig(feasible="subset", n_general=n, path=path,
                                                  ghost_pairs=ghost_pairs, sketch_dim=64,
                                                  sketch_min_numel=1 << 12)
    adapter = build_pixel_adapter("wan", "t2v", seed=0, height=size, width=size, num_frames=frames)
    return cfg, build_training_state(cfg, adapter)


def bench_regdpo(n: int, args: argparse.Namespace, frames: int, size: int, variants: dict,
                 case: str) -> list[dict]:
    """Reg-DPO projector steps on the tiny Wan against a plain Reg-DPO step (batch of
    `--video-pairs` pairs of frames x size x size clips, n general clips)."""
    from videodpo.data.pairs import random_pair_batch
    from videodpo.regularized_step import (
        GeneralClips,
        build_video_regularizer,
        general_training_step,
    )
    from videodpo.step import training_step

    cfg, plain = _wan_state(n, frames, size, "ghost", "auto", "off")
    batch = random_pair_batch(plain.adapter, args.video_pairs, frames, size, size)
    clips = GeneralClips([{"clip": c, "text": t} for c, t in
                          zip(batch.chosen.repeat(n, 1, 1, 1, 1)[:n],
                              batch.cond["text"].repeat(n, 1, 1)[:n])], "bench")
    steps = {"plain Reg-DPO step": lambda: training_step(plain, [batch])}
    if case == "regdpo":  # the same forwards and backwards, one mixed loss
        _, mixed = _wan_state(n, frames, size, "ghost", "auto", "mix")
        steps["plain + general (mix)"] = lambda: general_training_step(mixed, [batch], clips, None)
    for name, (path, pairs) in variants.items():
        _, state = _wan_state(n, frames, size, path, pairs, "projector")
        reg = build_video_regularizer(state)
        steps[name] = (lambda s=state, r=reg: general_training_step(s, [batch], clips, r))
    tokens = frames * (size // 2) * (size // 2)
    times = alternate(steps, args.repeats)
    return ratio_rows(case, n, times, "plain Reg-DPO step", tokens_per_clip=tokens)


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | n | path | step s | time / plain | peak MiB | mem / plain |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['n']} | {r['path']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['model']} | {r['n']} | {r['path']} | {r['seconds']:.3f} | "
                         f"{r['time_ratio']:.2f} | {r['peak_mib']:.0f} | {r['mem_ratio']:.2f} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for col, model in enumerate(models):
        for path in sorted({r["path"] for r in rows if r["path"] != "plain"}):
            pts = [r for r in rows if r["model"] == model and r["path"] == path and "skipped" not in r]
            if not pts:
                continue
            ns = [r["n"] for r in pts]
            axes[0, col].plot(ns, [r["time_ratio"] for r in pts], marker="o", label=path)
            axes[1, col].plot(ns, [r["mem_ratio"] for r in pts], marker="o", label=path)
        axes[0, col].axhline(1.5, color="grey", ls="--", lw=0.8)
        axes[0, col].set_title(f"{model}: step time / plain SFT step")
        axes[1, col].set_title(f"{model}: peak memory / plain SFT step")
        for ax in axes[:, col]:
            ax.set_xlabel("n general samples")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/projector_bench")
    parser.add_argument("--models", default="tiny,50m")
    parser.add_argument("--n", default="4,8,16")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--target-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--materialized-max-gb", type=float, default=2.5)
    parser.add_argument("--cases", default="sft,dapo,regdpo,video-tokens",
                        help="sft (the models above), dapo, regdpo (tiny Wan), video-tokens "
                             "(ghost_pairs auto / ghost / sketch on Wan at video token counts)")
    parser.add_argument("--dapo-batch", type=int, default=64, help="sequences per DAPO update")
    parser.add_argument("--video-pairs", type=int, default=2)
    parser.add_argument("--video-tokens", default="8x16,8x32",
                        help="frames x size of the video-tokens case (tokens = frames * size^2 / 4)")
    args = parser.parse_args(argv)
    args.paths = args.paths.split(",")
    torch.set_num_threads(args.threads)
    cases = args.cases.split(",")
    ns = [int(x) for x in args.n.split(",")]
    rows = []
    if "sft" in cases:
        for name in args.models.split(","):
            rows += bench_model(name, ns, args)
    if "dapo" in cases:
        for n in ns:
            rows += bench_dapo(n, args)
    if "regdpo" in cases:
        for n in ns:
            rows += bench_regdpo(n, args, 8, 16, {"projector (ghost)": ("ghost", "auto")}, "regdpo")
    if "video-tokens" in cases:
        variants = {"ghost_pairs=auto": ("ghost", "auto"), "ghost_pairs=ghost": ("ghost", "ghost"),
                    "sketch": ("sketch", "ghost")}
        for spec in args.video_tokens.split(","):
            frames, size = (int(x) for x in spec.split("x"))
            rows += bench_regdpo(4, args, frames, size, variants, f"wan {spec}")
    write_outputs(rows, Path(args.out))
    return 0


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # CPU peak memory is repeatable with it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.exit(main())
