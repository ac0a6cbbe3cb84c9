"""Latent cache: a round trip equals encoding on the fly (T2V and I2V), training reads it
without loading diffusers, it refuses another model, and precompute resumes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from common.errors import DataError
from videodpo import precompute as precompute_job
from videodpo.cli import main
from videodpo.config import PrecomputeConfig
from videodpo.data.dataset import CachedPairDataset, PairDataset
from videodpo.data.latent_cache import LatentCache, model_fingerprint
from videodpo.data.video_io import write_video
from videodpo.models import load_adapter
from videodpo.precompute import precompute
from videodpo.row_jobs import RowCounts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(3):
        for kind in ("chosen", "rejected"):
            clip = torch.rand(3, 9, 32, 48, generator=g) * 2 - 1
            write_video(root / f"{kind}{i}.mp4", clip)
        rows.append({"chosen": f"chosen{i}.mp4", "rejected": f"rejected{i}.mp4",
                     "caption": f"a red square moving left {i}", "meta": {"seed": i}})  # fmt: skip
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _cfg(pairs: Path, model: Path, out: Path, **kw) -> PrecomputeConfig:
    return PrecomputeConfig(
        manifest=str(pairs), model=str(model), out_dir=str(out), height=32, width=32, **kw
    )


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_cache_round_trip_equals_on_the_fly(models, pairs, tmp_path, task):
    counts = precompute(_cfg(pairs, models[task], tmp_path / "cache", rows_per_shard=2))
    assert counts == RowCounts(done=3, skipped=0, failed=0)
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 2
    cache = CachedPairDataset(tmp_path / "cache", expect_model=models[task])
    # the reference: decode the clips and encode them now, as training without a cache does
    adapter = load_adapter(models[task])
    fly = PairDataset(pairs, height=32, width=32, with_first_frame=True)
    assert len(cache) == len(fly) == 3
    for i in range(3):
        cached, item = cache[i], fly[i]
        assert cached["row"] == item["row"] and cached["caption"] == item["caption"]
        assert cached["meta"] == item["meta"]
        with torch.no_grad():
            for key in ("chosen", "rejected"):
                ref = adapter.encode_video(item[key][None])[0]
                assert cached[key].shape == ref.shape == (16, 3, 4, 4)
                torch.testing.assert_close(cached[key], ref, rtol=1e-5, atol=1e-6)
            cond = adapter.prepare_conditions([item["caption"]], item["first_frame"][None], 9)
        assert set(cond) == {"text"} | (
            {"image_latents", "image_embeds"} if task == "i2v" else set()
        )
        for key, ref in cond.items():
            torch.testing.assert_close(cached[key], ref[0], rtol=1e-5, atol=1e-6)


def test_training_reads_the_cache_without_diffusers(models, pairs, tmp_path, capsys):
    config = tmp_path / "precompute.yaml"
    config.write_text(yaml.safe_dump(asdict(_cfg(pairs, models["t2v"], tmp_path / "cache"))))
    assert main(["precompute", "--config", str(config)]) == 0
    assert "3 rows encoded, 0 skipped (done before), 0 failed" in capsys.readouterr().out
    code = (
        "import sys; from videodpo.data.dataset import CachedPairDataset, collate_pairs; "
        f"ds = CachedPairDataset({str(tmp_path / 'cache')!r}, expect_model={str(models['t2v'])!r}); "
        "b = collate_pairs([ds[0], ds[1]]); print(tuple(b['chosen'].shape), tuple(b['text'].shape)); "
        "assert not {'diffusers', 'transformers'} & set(sys.modules), 'model code was imported'"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(2, 16, 3, 4, 4) (2, 512, 32)"  # Wan pads prompts to 512
    # the zero padding is not stored, only the prompt's own tokens
    with safe_open(str(tmp_path / "cache" / "shard-r0-00000.safetensors"), "pt") as f:
        assert f.get_slice("r00000001.text").get_shape()[0] < 20


def test_cache_refuses_another_model(models, pairs, tmp_path):
    precompute(_cfg(pairs, models["t2v"], tmp_path / "cache"))
    with pytest.raises(DataError, match="does not match"):
        LatentCache(tmp_path / "cache", expect_model=models["i2v"])
    with pytest.raises(DataError, match="another out_dir"):
        precompute(_cfg(pairs, models["i2v"], tmp_path / "cache"))
    with pytest.raises(DataError, match="another out_dir"):  # other settings, same model
        precompute(replace(_cfg(pairs, models["t2v"], tmp_path / "cache"), height=16, width=16))
    # the transformer does not enter the cache: a fine-tuned transformer may reuse it
    tuned = tmp_path / "tuned"
    shutil.copytree(models["t2v"], tuned)
    weights = next((tuned / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert model_fingerprint(tuned) == model_fingerprint(models["t2v"])
    LatentCache(tmp_path / "cache", expect_model=tuned)
    # any VAE change does
    vae = next((tuned / "vae").glob("*.safetensors"))
    vae.write_bytes(vae.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DataError, match="does not match"):
        LatentCache(tmp_path / "cache", expect_model=tuned)


def test_precompute_resumes_after_interruption(models, pairs, tmp_path, monkeypatch):
    cfg = _cfg(pairs, models["t2v"], tmp_path / "cache", rows_per_shard=1)
    real = precompute_job.encode_pair
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(precompute_job, "encode_pair", interrupted)
    with pytest.raises(KeyboardInterrupt):
        precompute(cfg)
    first = (tmp_path / "cache" / "shard-r0-00000.safetensors").read_bytes()
    monkeypatch.setattr(precompute_job, "encode_pair", real)
    assert precompute(cfg) == RowCounts(done=2, skipped=1, failed=0)
    assert (tmp_path / "cache" / "shard-r0-00000.safetensors").read_bytes() == first
    resumed = LatentCache(tmp_path / "cache")
    fresh_cfg = replace(cfg, out_dir=str(tmp_path / "fresh"))
    precompute(fresh_cfg)
    fresh = LatentCache(tmp_path / "fresh")
    assert [e["row"] for e in resumed.entries] == [1, 2, 3]
    for i in range(3):
        for key in ("chosen", "rejected", "text"):
            assert torch.equal(resumed[i][key], fresh[i][key])


def test_damaged_shard_rows_are_skipped_and_counted(models, pairs, tmp_path):
    precompute(_cfg(pairs, models["t2v"], tmp_path / "cache", rows_per_shard=1))
    shard = tmp_path / "cache" / "shard-r0-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    ds = CachedPairDataset(tmp_path / "cache", max_bad_fraction=0.5)
    assert [ds[i]["row"] for i in range(3)] == [1, 3, 3]
    assert ds.bad.count == 1 and "shard-r0-00001" in ds.bad.reasons[2]
    strict = CachedPairDataset(tmp_path / "cache", max_bad_fraction=0.0)
    with pytest.raises(DataError, match="1 of 3 rows are bad"):
        strict[1]


def _precompute_on_rank(rank: int, world_size: int, cfg: PrecomputeConfig) -> dict:
    return precompute(cfg)


@pytest.mark.slow  # two spawned processes importing diffusers: about a minute on 2 cores
def test_precompute_split_over_data_parallel_ranks(models, pairs, tmp_path):
    from tests.multiproc import run_on_ranks

    cfg = _cfg(pairs, models["t2v"], tmp_path / "dp")
    results = run_on_ranks(_precompute_on_rank, 2, cfg)
    assert results == [RowCounts(done=3, skipped=0, failed=0)] * 2
    assert sorted(p.name for p in (tmp_path / "dp").glob("shard-*.json")) == [
        "shard-r0-00000.json",
        "shard-r1-00000.json",
    ]
    precompute(replace(cfg, out_dir=str(tmp_path / "one")))
    dp, one = LatentCache(tmp_path / "dp"), LatentCache(tmp_path / "one")
    assert [e["row"] for e in dp.entries] == [1, 2, 3]
    for i in range(3):
        for key in ("chosen", "rejected", "text"):
            assert torch.equal(dp[i][key], one[i][key])


def test_training_from_the_cache_constructs_no_vae_or_encoder(models, pairs, tmp_path):
    """`videodpo train` on a latent cache loads the transformer and the scheduler only:
    no VAE, text or image encoder is constructed (recorded at their constructors), and
    the full export still is a complete pipeline folder (their files copied)."""
    import functools
    from unittest import mock

    import diffusers
    import transformers

    from videodpo.config import RunConfig
    from videodpo.trainer import train

    precompute(_cfg(pairs, models["i2v"], tmp_path / "cache"))
    built: list[str] = []

    def recording(cls):
        real = cls.__init__

        @functools.wraps(real)  # diffusers reads the config keys off the signature
        def init(self, *args, **kwargs):
            built.append(cls.__name__)
            real(self, *args, **kwargs)

        return mock.patch.object(cls, "__init__", init)

    watched = (diffusers.AutoencoderKLWan, transformers.UMT5EncoderModel, transformers.CLIPVisionModel,
               diffusers.WanTransformer3DModel)
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    cfg.model.path, cfg.data.latent_cache = str(models["i2v"]), str(tmp_path / "cache")
    cfg.loss.beta, cfg.optim.lr, cfg.train.steps, cfg.train.batch_size = 100.0, 1e-3, 2, 2
    with recording(watched[0]), recording(watched[1]), recording(watched[2]), recording(watched[3]):
        result = train(cfg)
    assert built == ["WanTransformer3DModel", "WanTransformer3DModel"]  # policy, reference
    assert result.steps == 2
    exported = load_adapter(result.export_dir)  # VAE and encoders copied, transformer trained
    start = load_adapter(models["i2v"])
    assert exported.vae is not None and exported.pipeline.image_encoder is not None
    moved = [n for n, p in exported.transformer.state_dict().items()
             if not torch.equal(p, start.transformer.state_dict()[n])]
    assert moved
