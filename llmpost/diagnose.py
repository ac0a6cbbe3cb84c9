"""Stage-1 diagnosis: the capability map (score per task), weak tasks, and the stage-2
sampling weights that cover every SNS task with the weak ones up-weighted.

Covering every task matters: a prototype that fine-tuned on the two weak tasks alone
collapsed the other SNS tasks (docs/design.md section 7).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmpost.config import DiagnoseConfig


def capability_map(evaluation: dict[str, Any], cfg: DiagnoseConfig) -> dict[str, Any]:
    """Scores per SNS task, the weak ones (below threshold, plus the bottom k), weights."""
    sns = {t: s for t, s in evaluation["tasks"].items() if evaluation["categories"][t] == "sns"}
    weak = {t for t, s in sns.items() if s < cfg.threshold}
    if cfg.bottom_k:
        weak |= set(sorted(sns, key=lambda t: (sns[t], t))[: cfg.bottom_k])
    return {
        "scores": sns,
        "general_scores": {t: s for t, s in evaluation["tasks"].items() if t not in sns},
        "threshold": cfg.threshold,
        "bottom_k": cfg.bottom_k,
        "weak": sorted(weak),
        "weights": stage2_weights(sns, weak, cfg.weak_weight),
    }


def stage2_weights(scores: dict[str, float], weak: set[str], weak_weight: float) -> dict[str, float]:
    """Sampling weight per SNS task: every task 1, weak tasks `weak_weight` (normalised)."""
    raw = {t: (weak_weight if t in weak else 1.0) for t in scores}
    total = sum(raw.values())
    return {t: w / total for t, w in raw.items()}


def write_capability_map(cap: dict[str, Any], out_dir: str | Path) -> Path:
    """`capability_map.json` and a bar plot `capability_map.png` (weak tasks in red)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "capability_map.json"
    path.write_text(json.dumps(cap, indent=2))
    import matplotlib  # lazy: plotting only; keeps matplotlib off the import path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    tasks = list(cap["scores"]) + list(cap["general_scores"])
    values = [cap["scores"].get(t, cap["general_scores"].get(t)) for t in tasks]
    colors = ["tab:red" if t in cap["weak"] else
              ("tab:blue" if t in cap["scores"] else "tab:gray") for t in tasks]
    fig, ax = plt.subplots(figsize=(max(4, len(tasks) * 0.8), 3))
    ax.bar(tasks, values, color=colors)
    ax.axhline(cap["threshold"], color="k", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("capability map after stage 1 (red: weak, gray: general)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out_dir / "capability_map.png", dpi=100)
    plt.close(fig)
    return path
