"""What a demo run over several seeds reports: per arm and metric the mean, the sample
standard deviation and the number of seeds, and each claim under test with whether it
held and by how much. Both demos write these as `results.json`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Claim:
    """One claim of a paper put to the test: `held` and the numbers behind it."""

    claim: str
    held: bool
    evidence: str


def summarize_seeds(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """`per_seed[i][arm][metric]` -> `{arm: {metric: {mean, std, n_seeds, values}}}`.
    NaN values (a metric an arm does not have) are left out; std is the sample standard
    deviation (0 for one seed); mean and std are None where no seed has a value."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in per_seed:
        for arm, metrics in run.items():
            for metric, value in metrics.items():
                out.setdefault(arm, {}).setdefault(metric, {"values": []})["values"].append(float(value))
    for metrics in out.values():
        for stats in metrics.values():
            values = [v for v in stats["values"] if not math.isnan(v)]
            n = len(values)
            if not n:
                stats.update(mean=None, std=None, n_seeds=0, values=[])
                continue
            mean = sum(values) / n
            var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
            stats.update(mean=mean, std=math.sqrt(var), n_seeds=n, values=values)
    return out


def mean_of(summary: dict[str, dict[str, dict[str, Any]]], arm: str, metric: str) -> float:
    """The mean over seeds (NaN where no seed has a value)."""
    value = summary[arm][metric]["mean"]
    return float("nan") if value is None else float(value)


def mean_std(summary: dict[str, dict[str, dict[str, Any]]], arm: str, metric: str) -> str:
    """`0.612 ± 0.031` (or `-` where the arm has no value)."""
    stats = summary.get(arm, {}).get(metric)
    if not stats or not stats["n_seeds"]:
        return "-"
    return format_mean_std(stats["values"])


def format_mean_std(values: list[float], digits: int = 3) -> str:
    """`0.612 ± 0.031`: the mean and the sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def compare_claim(claim: str, summary: dict[str, dict[str, dict[str, Any]]], metric: str, better: str,
                  worse: str, higher_is_better: bool = True, label: str | None = None,
                  tolerance: float = 0.0) -> Claim:
    """The claim "`better` beats `worse` on `metric`" (means over seeds; with `tolerance`,
    "is no more than that much worse than"), with both means, stds and the difference as
    evidence."""
    a, b = mean_of(summary, better, metric), mean_of(summary, worse, metric)
    diff = a - b
    held = diff > -tolerance if higher_is_better else diff < tolerance
    name = label or metric.replace("_", " ")
    evidence = (f"{name}: {better} {mean_std(summary, better, metric)} vs {worse} "
                f"{mean_std(summary, worse, metric)} (difference {diff:+.3f}, "
                f"n_seeds {summary[better][metric]['n_seeds']})")
    return Claim(claim=claim, held=bool(held), evidence=evidence)


def format_claims(claims: list[Claim]) -> str:
    return "\n".join(f"[{'held' if c.held else 'did NOT hold'}] {c.claim}\n    {c.evidence}" for c in claims)


def results_payload(summary: dict[str, dict[str, dict[str, Any]]], claims: list[Claim],
                    **extra: Any) -> dict[str, Any]:
    """The `results.json` object: `arms`, `claims` and whatever else the demo adds."""
    return {"arms": summary, "claims": [asdict(c) for c in claims], **extra}
