"""`videodpo build-pairs` on tiny random Wan2.1 T2V and I2V pipelines loaded from disk:
generations match a direct pipeline call with the row's seed, interrupted runs resume,
data-parallel ranks split the rows and agree with one process."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from tests.multiproc import run_on_ranks
from tests.videodpo.synthetic_clips import write_dataset
from tests.videodpo.tiny_models import build_tiny_cogvideox_pipeline
from videodpo import build_pairs
from videodpo.build_pairs import build_gt_pairs, load_pipeline
from videodpo.cli import main
from videodpo.config import BuildPairsConfig
from videodpo.data.check import check_manifest
from videodpo.data.manifest import read_manifest
from videodpo.data.synthetic import WorldConfig
from videodpo.data.video_io import load_clip, probe_video

TOL = 3 / 127.5  # mp4 (4:4:4, crf 0) rounding


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    world = WorldConfig(height=32, width=32, num_frames=9, shape_size=8, bounce_prob=0.5)
    return write_dataset(tmp_path_factory.mktemp("clips"), world, num_clips=4, seed=0)


def _cfg(manifest: Path, model: Path, out: Path, **kw) -> BuildPairsConfig:
    base = dict(num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16, seed=10)
    base.update(kw)
    return BuildPairsConfig(manifest=str(manifest), model=str(model), out_dir=str(out), **base)


def _direct(model: Path, caption: str, seed: int, shape, image=None, guidance: float = 1.0):
    """The reference: the pipeline called by hand, as a user would."""
    pipe, task = load_pipeline(model, torch.float32)
    frames, height, width = shape
    kwargs = dict(
        prompt=caption, height=height, width=width, num_frames=frames, num_inference_steps=2,
        guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
        output_type="np", max_sequence_length=16,
    )  # fmt: skip
    if task == "i2v":
        from videodpo.data.video_io import to_pil_image

        kwargs["image"] = to_pil_image(image)
    out = torch.as_tensor(pipe(**kwargs).frames[0]).float()
    return out.permute(3, 0, 1, 2) * 2 - 1


def test_t2v_pairs_match_direct_generation(models, clips, tmp_path):
    cfg = _cfg(clips, models["t2v"], tmp_path / "out")
    summary = build_gt_pairs(cfg)
    assert (summary.done, summary.skipped, summary.failed) == (4, 0, 0)
    pairs = read_manifest(tmp_path / "out" / "pairs.jsonl")
    sources = read_manifest(clips)
    assert len(pairs) == 4
    for i, (pair, src) in enumerate(zip(pairs, sources)):
        assert pair["chosen"] == src["video"]  # same shape: the real clip is used as is
        assert pair["caption"] == src["caption"]
        assert pair["meta"]["seed"] == 10 + i + 1 and pair["meta"]["steps"] == 2
        info = probe_video(pair["rejected"])
        assert (info.num_frames, info.height, info.width) == (9, 32, 32)
    ref = _direct(models["t2v"], sources[2]["caption"], 13, (9, 32, 32))
    assert (load_clip(pairs[2]["rejected"]) - ref).abs().max() <= TOL
    assert not check_manifest(tmp_path / "out" / "pairs.jsonl").problems
    # the stored manifest is relative to its folder
    first = json.loads((tmp_path / "out" / "pairs.jsonl").read_text().splitlines()[0])
    assert first["rejected"] == "generated/000001.mp4"


def test_resume_after_interruption(models, clips, tmp_path, monkeypatch):
    cfg = _cfg(clips, models["t2v"], tmp_path / "out")
    calls = {"n": 0}
    real = build_pairs.generate_clip

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the job is killed while generating row 3
        return real(*args, **kwargs)

    monkeypatch.setattr(build_pairs, "generate_clip", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_gt_pairs(cfg)
    done_before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "generated").glob("*.mp4")}
    assert sorted(done_before) == ["000001.mp4", "000002.mp4"]
    monkeypatch.setattr(build_pairs, "generate_clip", real)
    summary = build_gt_pairs(cfg)
    assert (summary.done, summary.skipped, summary.failed) == (2, 2, 0)
    for name, data in done_before.items():  # finished rows were not redone
        assert (tmp_path / "out" / "generated" / name).read_bytes() == data
    resumed = read_manifest(tmp_path / "out" / "pairs.jsonl")
    fresh_summary = build_gt_pairs(replace(cfg, out_dir=str(tmp_path / "fresh")))
    assert fresh_summary.done == 4
    fresh = read_manifest(tmp_path / "fresh" / "pairs.jsonl")
    assert [p["meta"] for p in resumed] == [p["meta"] for p in fresh]
    for a, b in zip(resumed, fresh):
        assert torch.equal(load_clip(a["rejected"]), load_clip(b["rejected"]))
    # a third run finds nothing to do
    again = build_gt_pairs(cfg)
    assert (again.done, again.skipped) == (0, 4)


def test_i2v_with_resizing_and_a_failed_row(models, clips, tmp_path, capsys):
    rows = [json.loads(line) for line in clips.read_text().splitlines()][:2]
    rows.append({"video": "clips/missing.mp4", "caption": "a red square moving up"})
    manifest = clips.parent / "with_missing.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "build.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump(_cfg(manifest, models["i2v"], out).__dict__))
    code = main(
        ["build-pairs", "--config", str(config)]
        + ["--set", "num_frames=5", "--set", "height=16", "--set", "width=32"]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 1 and "1 failed" in printed, captured.err  # one row failed
    assert "2 rows generated, 0 skipped (done before), 1 failed" in printed
    pairs = read_manifest(out / "pairs.jsonl")
    assert len(pairs) == 2 and pairs[0]["meta"]["task"] == "i2v"
    src = read_manifest(manifest)[0]
    real = load_clip(src["video"], num_frames=5, height=16, width=32)
    # the resized real clip is written next to the generation, and is what was paired
    assert Path(pairs[0]["chosen"]).parent.name == "chosen"
    assert (load_clip(pairs[0]["chosen"]) - real).abs().max() <= TOL
    ref = _direct(models["i2v"], src["caption"], 10 + 1, (5, 16, 32), image=real[:, 0])
    assert (load_clip(pairs[0]["rejected"]) - ref).abs().max() <= TOL
    assert not check_manifest(out / "pairs.jsonl").problems
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["num_frames"] == 5 and saved["height"] == 16


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_cogvideox_pipelines(clips, tmp_path, task):
    model = build_tiny_cogvideox_pipeline(tmp_path / "cog", task)
    cfg = _cfg(clips, model, tmp_path / "out", limit=2)
    summary = build_gt_pairs(cfg)
    assert (summary.done, summary.failed) == (2, 0)
    pairs = read_manifest(tmp_path / "out" / "pairs.jsonl")
    src = read_manifest(clips)[1]
    first = load_clip(src["video"])[:, 0] if task == "i2v" else None
    ref = _direct(model, src["caption"], 10 + 2, (9, 32, 32), image=first)
    assert pairs[1]["meta"]["task"] == task
    assert (load_clip(pairs[1]["rejected"]) - ref).abs().max() <= TOL


def test_bad_shape_is_a_failed_row_not_a_crash(models, clips, tmp_path):
    cfg = _cfg(clips, models["t2v"], tmp_path / "out", num_frames=8, limit=1)
    summary = build_gt_pairs(cfg)
    assert (summary.done, summary.failed) == (0, 1)


def _build_on_rank(rank: int, world_size: int, cfg: BuildPairsConfig) -> dict:
    summary = build_gt_pairs(cfg)
    journal = Path(cfg.out_dir) / "journal" / f"rank{rank}.jsonl"
    mine = [json.loads(line)["meta"]["source_row"] for line in journal.read_text().splitlines()]
    return {"summary": summary.__dict__, "rows": mine}


@pytest.mark.slow  # two spawned processes importing diffusers: about a minute on 2 cores
def test_rows_split_over_data_parallel_ranks(models, clips, tmp_path):
    cfg = _cfg(clips, models["t2v"], tmp_path / "dp")
    results = run_on_ranks(_build_on_rank, 2, cfg)
    assert [r["rows"] for r in results] == [[1, 3], [2, 4]]
    assert all(r["summary"] == {"done": 4, "skipped": 0, "failed": 0} for r in results)
    single = build_gt_pairs(replace(cfg, out_dir=str(tmp_path / "single")))
    assert single.done == 4
    dp = read_manifest(tmp_path / "dp" / "pairs.jsonl")
    one = read_manifest(tmp_path / "single" / "pairs.jsonl")
    assert [p["meta"]["source_row"] for p in dp] == [1, 2, 3, 4]
    for a, b in zip(dp, one):
        assert torch.equal(load_clip(a["rejected"]), load_clip(b["rejected"]))
