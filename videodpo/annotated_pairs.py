"""Annotated pairs: two generations per prompt, the one a scorer ranks higher preferred.

The Reg-DPO paper compares GT-Pairs (real clip preferred over a generation) with pairs of
two generations labelled by people. `annotate_pairs` stands in for the labellers with any
scorer of a clip against its prompt (the demo uses motion fidelity), so both kinds of
pairs can be built from the same base and compared at an equal budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AnnotatedPairs:
    """Preferred and rejected clips `(N, C, F, H, W)` and the scores that chose them."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_scores: list[float]
    rejected_scores: list[float]

    @property
    def num_ties(self) -> int:
        """Pairs the scorer could not tell apart (kept, first generation preferred)."""
        return sum(a == b for a, b in zip(self.chosen_scores, self.rejected_scores))


def annotate_pairs(first: torch.Tensor, second: torch.Tensor, prompts: Sequence[Any],
                   score: Callable[[torch.Tensor, Any], float]) -> AnnotatedPairs:
    """For each prompt `i`, prefer whichever of `first[i]` and `second[i]` scores higher
    by `score(clip, prompts[i])` (the first on a tie)."""
    if first.shape != second.shape or first.shape[0] != len(prompts):
        raise ValueError(f"two generations per prompt expected: shapes {tuple(first.shape)} and "
                         f"{tuple(second.shape)} for {len(prompts)} prompts")
    chosen, rejected, chosen_scores, rejected_scores = [], [], [], []
    for a, b, prompt in zip(first, second, prompts):
        sa, sb = float(score(a, prompt)), float(score(b, prompt))
        if sb > sa:
            a, b, sa, sb = b, a, sb, sa
        chosen.append(a)
        rejected.append(b)
        chosen_scores.append(sa)
        rejected_scores.append(sb)
    return AnnotatedPairs(torch.stack(chosen), torch.stack(rejected), chosen_scores, rejected_scores)
