"""Reg-DPO with general clips: mixed into the loss, or as the regularizer of
`common.regularizer` (the `regularizer:` section of a video run config).

General data are real clips with captions and no pairs (`regularizer.general_manifest`,
a clip manifest of `video` + `caption` rows, or `regularizer.general_cache`, a latent
cache whose `chosen` latents are the clips). Their signal is the per-clip SFT error
e(model, x) of the run's objective (flow matching or epsilon / v prediction).

- `mode: mix`: each step minimises L_reg + `mix_weight` * mean over the general clips of
  their SFT error (one backward).
- `mode: projector`: the target is the per-pair Reg-DPO loss (`videodpo.losses.reg_dpo_sample_losses`
  per pair, the reference forward in no-grad inside the loss function); the general
  clips give per-clip SFT errors; the target gradient is projected per parameter group
  onto their feasible set (docs/design.md section 5).

Timesteps and noise are drawn before the loss function runs and travel in the batch, so
the regularizer's passes see the same ones. Pair timesteps come from the run's generator
(as `videodpo.step.pair_errors` draws them); the general batch and its noise come
from a generator seeded by (seed, step) alone: every rank draws the same general batch
and a resumed run the same as an uninterrupted one.

Parallelism: the projector works under FSDP2 (`parallel.dp_shard`) with the regularizer's
contract, every rank holding the same batches: each rank draws its own pairs' t and
noise, then the whole batch is all-gathered so all ranks project the same target. Pair
and context parallelism split one sample over ranks, which the regularizer's per-sample
Gram cannot see: a `regularizer` with `parallel.pair: 2` or `parallel.cp > 1` is refused
before training (`check_regularizer`).

Default path for video (`videodpo.config.RegularizerSection`): `ghost` with
`granularity: layer` and `ghost_pairs: auto`. At video token counts the token x token Gram
blocks of the ghost products cost 2 N^2 (in + out) for N tokens, while one layer's n
per-sample gradients cost about n in out (2T + 128): `auto` forms the latter for a Linear
once T is in the hundreds and frees them layer by layer. Measured on the tiny Wan at 512
tokens a clip, 2 pairs + 4 general clips, 2-core CPU (`python tools/projector_bench.py
--cases video-tokens --n 8 --repeats 5 --video-tokens 8x16`): auto 2.5x a plain Reg-DPO
step, `ghost_pairs: ghost` 19.7x, `sketch` 18.4x.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.errors import ConfigError, DataError
from common.regularizer import DataRegularizer, RegularizerStats
from videodpo.data.dataset import CachedPairDataset
from videodpo.data.manifest import check_fields, read_manifest_rows, resolve_path
from videodpo.data.video_io import load_clip
from videodpo.losses import loss_weights, reg_dpo_sample_losses


def check_regularizer(cfg: Any) -> None:
    """One-line ConfigErrors for a `regularizer` section that cannot run (before training)."""
    reg = cfg.regularizer
    if reg.mode == "off":
        return
    if bool(reg.general_manifest) == bool(reg.general_cache):
        raise ConfigError("regularizer.general_manifest / regularizer.general_cache: set exactly one "
                          "to the general clips")
    if cfg.parallel.pair != 1 or cfg.parallel.cp != 1:
        raise ConfigError(
            f"regularizer.mode={reg.mode} with parallel.pair={cfg.parallel.pair} and parallel.cp="
            f"{cfg.parallel.cp}: general clips need whole samples per rank; set parallel.pair: 1 "
            "and parallel.cp: 1 (or regularizer.mode: off)")
    if reg.mode == "projector" and cfg.train.grad_accum != 1:
        raise ConfigError(f"regularizer.mode=projector needs train.grad_accum: 1, got "
                          f"{cfg.train.grad_accum} (raise train.batch_size instead)")
    if reg.mode == "projector" and cfg.train.mixed_precision != "no":
        raise ConfigError("regularizer.mode=projector needs train.mixed_precision: no")


class GeneralClips:
    """General clips (latents `(C, f, h, w)` with their text conditions) drawn per step."""

    def __init__(self, items: list[dict], source: str) -> None:
        if not items:
            raise DataError(f"{source}: no general clips")
        self.items = items
        self.source = source

    @classmethod
    def open(cls, cfg: Any, adapter: Any) -> GeneralClips:
        """Read every clip named by `regularizer.general_manifest` or `.general_cache`."""
        reg = cfg.regularizer
        if reg.general_cache:
            data = CachedPairDataset(reg.general_cache, expect_model=cfg.model.path or None)
            items = [{"clip": it["chosen"], "text": it["text"]} for it in
                     (data.load(i) for i in range(len(data.cache)))]
            return cls(items, reg.general_cache)
        path = Path(reg.general_manifest)
        items = []
        for row in read_manifest_rows(path):
            try:
                check_fields(row, "clip")
            except DataError as err:
                raise DataError(f"{path}:{row.index}: {err}") from None
            clip = load_clip(resolve_path(path.parent, row.data["video"]),
                             num_frames=cfg.data.num_frames or None,
                             height=cfg.data.height or None, width=cfg.data.width or None)
            with adapter.encoders_on_device():
                latent = adapter.encode_video(clip[None].to(adapter.encoder_device))[0].cpu()
                text = adapter.encode_prompts([row.data["caption"]])[0].cpu()
            items.append({"clip": latent, "text": text})
        return cls(items, str(path))

    def draw(self, adapter: Any, n: int, seed: int, step: int) -> dict[str, torch.Tensor]:
        """n clips with t and noise, the same on every rank for (seed, step)."""
        rng = random.Random(f"{seed}/general/{step}")
        rows = [self.items[rng.randrange(len(self.items))] for _ in range(n)]
        gen = torch.Generator().manual_seed(rng.randrange(2**62))
        clip = torch.stack([r["clip"] for r in rows])
        return {"clip": clip, "cond/text": torch.stack([r["text"] for r in rows]),
                "t": adapter.objective.sample_timesteps(n, gen),
                "noise": torch.randn(clip.shape, generator=gen).to(clip.dtype)}


def pair_batch(state: Any, batch: Any) -> dict[str, torch.Tensor]:
    """A `PairBatch` with its t and noise drawn from the run's generator (as
    `pair_errors` draws them), as one dict of tensors."""
    b = batch.chosen.shape[0]
    t = state.adapter.objective.sample_timesteps(b, state.generator, *state.timestep_range)
    noise = torch.randn(batch.chosen.shape, generator=state.generator).to(batch.chosen.dtype)
    out = {"chosen": batch.chosen, "rejected": batch.rejected, "t": t, "noise": noise}
    out.update({f"cond/{k}": v for k, v in batch.cond.items()})
    return out


class RegDpoSampleLoss:
    """`loss_fn(model, batch) -> (B,)`: per-pair Reg-DPO losses, or per-clip SFT errors
    for a general batch (one with `clip`)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.metrics: dict[str, float] = {}

    def _errors(self, model, x, t, noise, cond):
        return self.state.adapter.training_error(model, x, noise, t, cond)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.state.layout.device
        batch = {k: v.to(device) for k, v in batch.items()}
        cond = {k[5:]: v for k, v in batch.items() if k.startswith("cond/")}
        if "clip" in batch:
            return self._errors(model, batch["clip"], batch["t"], batch["noise"], cond)
        cfg = self.state.cfg
        b = batch["chosen"].shape[0]
        x = torch.cat([batch["chosen"], batch["rejected"]])
        two = {k: torch.cat([v, v]) for k, v in cond.items()}
        t, noise = torch.cat([batch["t"], batch["t"]]), torch.cat([batch["noise"], batch["noise"]])
        e_policy = self._errors(model, x, t, noise, two)
        with torch.no_grad(), self.state.reference_context():
            ref = self.state.reference if self.state.reference is not None else self.state.policy
            e_ref = self._errors(ref, x, t, noise, two)
        dpo_w, sft_w = loss_weights(cfg.loss.kind, cfg.loss.sft_weight)
        losses, self.metrics = reg_dpo_sample_losses(
            e_policy[:b], e_policy[b:], e_ref[:b], e_ref[b:],
            beta=cfg.loss.beta, sft_weight=sft_w, dpo_weight=dpo_w)
        return losses


def _gather(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dict concatenated over all ranks (rank order), so every rank holds the same."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return batch
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.cpu() for k, v in batch.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in batch}


def build_video_regularizer(state: Any) -> DataRegularizer | None:
    """The run's regularizer in projector mode; None otherwise."""
    reg = state.cfg.regularizer
    if reg.mode != "projector":
        return None
    return DataRegularizer(state.policy, reg.projector)


def general_training_step(state: Any, batches: list[Any], general: GeneralClips,
                          regularizer: DataRegularizer | None) -> dict[str, float]:
    """One optimizer step with general clips (mix or projector); metrics as
    `videodpo.step.training_step` reports them, plus `general_sft` and projector stats."""
    cfg = state.cfg
    reg = cfg.regularizer
    loss_fn = RegDpoSampleLoss(state)
    general_batch = general.draw(state.adapter, reg.projector.n_general, cfg.train.seed, state.step)
    state.optimizer.zero_grad(set_to_none=True)
    if regularizer is not None:
        regularizer.steps = state.step  # sketch seeds follow the run's step (resume)
        (batch,) = batches
        target = _gather(pair_batch(state, batch))
        stats: RegularizerStats | None = regularizer.step(loss_fn, target, general_batch)
        metrics = dict(loss_fn.metrics)
        metrics.update({f"projector/{k}": float(v) for k, v in vars(stats).items()})
        metrics["general_sft"] = stats.general_loss
        finite = math.isfinite(stats.target_loss)
    else:
        metrics, finite = {}, True
        for batch in batches:
            losses = loss_fn(state.policy, pair_batch(state, batch))
            general_err = loss_fn(state.policy, general_batch).mean()
            total = losses.mean() + reg.mix_weight * general_err
            finite = finite and math.isfinite(total.item())
            if finite:
                (total / len(batches)).backward()
            for k, v in {**loss_fn.metrics, "general_sft": general_err.item()}.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(batches)
        state.layout.reduce_gradients(state.policy)
    params = [p for p in state.policy.parameters() if p.requires_grad]
    grad_norm = float("nan")
    finite = state.layout.all_ranks_agree(finite)
    if finite:
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = state.layout.all_ranks_agree(math.isfinite(grad_norm))
    if finite:
        state.optimizer.step()
        state.scheduler.step()
    else:
        state.optimizer.zero_grad(set_to_none=True)
        state.nonfinite += 1
        if state.nonfinite > cfg.train.max_nonfinite:
            raise ConfigError(f"{state.nonfinite} steps had a non-finite loss or gradient "
                              f"(train.max_nonfinite={cfg.train.max_nonfinite}); lower optim.lr")
    state.step += 1
    metrics.update(grad_norm=grad_norm, lr=state.scheduler.get_last_lr()[0],
                   nonfinite_steps=float(state.nonfinite))
    return metrics
