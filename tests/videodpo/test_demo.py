"""The demo end to end on a shrunken setting: every artefact is written, the table holds
what the saved models give when measured again by hand."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from videodpo.data.manifest import read_manifest
from videodpo.data.synthetic import WorldConfig, caption, render_batch, sample_records
from videodpo.demo import METHODS, DemoConfig, run_demo
from videodpo.models import load_adapter


def test_demo_runs_end_to_end_and_reports_what_the_models_do(tmp_path):
    world = WorldConfig(height=8, width=8, num_frames=4, shape_size=4, slow_step=1, fast_step=2, speeds=("fast",))
    demo = DemoConfig(world=world, num_base_clips=16, num_pair_clips=4, num_heldout_clips=4, base_steps=4,
                      tune_steps=2, batch_size=4, pair_batch_size=2, sample_steps=2, num_layers=1, num_heads=2,
                      patch_size=(1, 2, 2))
    result = run_demo(tmp_path, demo)
    rows = result["rows"]
    assert set(rows) == {"base", *METHODS, "real clips"}
    assert rows["real clips"]["motion_fidelity"] == 1.0
    for name in METHODS:
        assert 0.0 <= rows[name]["dpo_accuracy"] <= 1.0
    for name in ("table.md", "results.json", "contact_sheet.png", "results.png"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"]["dpo"]["heldout_error"] == rows["dpo"]["heldout_error"]
    assert "| reg_dpo |" in (tmp_path / "table.md").read_text()
    pairs = read_manifest(tmp_path / "pairs" / "pairs.jsonl")
    assert len(pairs) == 4 and all(p["caption"] for p in pairs)

    # the held-out error of the DPO-tuned export, measured again by hand
    records = sample_records(world, 24, demo.seed)[20:]
    clips = render_batch(records)
    tuned = load_adapter(tmp_path / "dpo" / "final")
    assert tuned.task == demo.task == "i2v"
    cond = tuned.prepare_conditions([caption(r) for r in records], clips[:, :, 0], world.num_frames)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    errors = []
    for level in (0.125, 0.375, 0.625, 0.875):
        t = torch.full((4,), level * 1000)
        noisy = (1 - level) * clips + level * noise
        with torch.no_grad():
            pred = tuned.predict(tuned.transformer, noisy, t, cond)
        errors.append(((pred - (noise - clips)) ** 2).mean())
    assert float(torch.stack(errors).mean()) == pytest.approx(rows["dpo"]["heldout_error"], rel=1e-4)


@pytest.mark.slow
def test_default_demo_base_learns_motion(tmp_path):
    """DESIGN section 6: the demo's base must visibly learn motion within its budget. A
    still shape scores about 0.14, real clips 1.0; the base trains its full default
    steps (about 3.5 minutes), the tuning runs are cut to two steps."""
    demo = replace(DemoConfig(), tune_steps=2, num_pair_clips=8, num_heldout_clips=16)
    rows = run_demo(tmp_path, demo)["rows"]
    assert rows["real clips"]["motion_fidelity"] == 1.0
    assert rows["base"]["motion_fidelity"] > 0.8
