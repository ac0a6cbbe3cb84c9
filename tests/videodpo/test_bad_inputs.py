"""Every bad input of the new-user sweep, through the real `videodpo` CLI: a non-zero exit,
no traceback, and a message naming the file, row or key; plus a refused resume."""

import pytest
import yaml

from tests.cli_cases import run_cli_cases, run_cli_process


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Writes the inputs, runs every case in one CLI process; returns (results, expected)."""
    root = tmp_path_factory.mktemp("video_bad")
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump({"out_dir": str(root / "out"), "model": {"path": str(root / "model")},
                                      "data": {"manifest": str(root / "pairs.jsonl")}}))

    def train(*sets):
        argv = ["train", "--config", str(config)]
        for item in sets:
            argv += ["--set", item]
        return argv

    latin1 = root / "latin1.jsonl"
    latin1.write_bytes(b'{"chosen": "a.mp4", "rejected": "b.mp4", "caption": "x"}\n'
                       b'{"chosen": "a.mp4", "rejected": "b.mp4", "caption": "caf\xe9"}\n')
    bad_meta = root / "bad_meta.csv"
    bad_meta.write_text('chosen,rejected,caption,meta\na.mp4,b.mp4,cap,"{oops"\n')
    bad_frames = root / "bad_frames.csv"
    bad_frames.write_text("video,caption,num_frames\na.mp4,cap,eight\n")
    bad_yaml = root / "latin1.yaml"
    bad_yaml.write_bytes(b"out_dir: caf\xe9\n")
    a_file = root / "a_file"
    a_file.write_text("x")

    # A run to resume, saved with other loss, batch size and step count.
    run_dir = root / "resumed"
    run_dir.mkdir()
    saved = run_dir / "config.yaml"
    saved.write_text(yaml.safe_dump({"out_dir": str(run_dir), "loss": {"kind": "dpo"},
                                     "train": {"steps": 10, "batch_size": 2}}))
    before = saved.read_bytes()

    cases = {
        "non_utf8_manifest": (["check-data", "--manifest", str(latin1)], "latin1.jsonl:2: not UTF-8"),
        "csv_bad_meta_json": (["check-data", "--manifest", str(bad_meta)],
                              "bad_meta.csv: row 1: field 'meta': not JSON"),
        "csv_non_integer_num_frames": (["check-data", "--manifest", str(bad_frames)],
                                       "bad_frames.csv: row 1: field 'num_frames': expected an integer"),
        "manifest_is_a_directory": (["check-data", "--manifest", str(root)], "is a directory"),
        "min_frames_zero": (["check-data", "--manifest", str(latin1), "--min-frames", "0"],
                            "--min-frames: expected an integer >= 1, got 0"),
        "non_utf8_yaml": (["train", "--config", str(bad_yaml)], "latin1.yaml: not UTF-8"),
        "negative_lr": (train("optim.lr=-1e-5"), "--set optim.lr=-1e-5: key 'optim.lr' expects a value > 0"),
        "log_every_zero": (train("train.log_every=0"), "key 'train.log_every' expects a value >= 1, got 0"),
        "bad_row_fraction_above_1": (train("data.max_bad_row_fraction=1.5"),
                                     "key 'data.max_bad_row_fraction' expects a value in [0,1]"),
        "bad_row_fraction_below_0": (train("data.max_bad_row_fraction=-0.1"),
                                     "key 'data.max_bad_row_fraction' expects a value in [0,1]"),
        "steps_zero": (train("train.steps=0"), "key 'train.steps' expects a value >= 1, got 0"),
        "out_dir_is_a_file": (train(f"out_dir={a_file}"), f"out_dir: {a_file} is a file"),
        "unknown_set_key": (train("optim.lrr=1"), "--set optim.lrr=1: unknown key 'optim.lrr'"),
        "resume_with_changed_config": (
            train(f"out_dir={run_dir}", "train.steps=20", "train.batch_size=4") + ["--resume"],
            "resuming with a different config"),
    }
    cases["help"] = (["train", "--help"], "--set")
    results = run_cli_cases("videodpo.cli", {k: v[0] for k, v in cases.items()}, root)
    results["resume_with_changed_config"]["config_unchanged"] = saved.read_bytes() == before
    return results, {k: v[1] for k, v in cases.items()}


CASES = [
    "non_utf8_manifest", "csv_bad_meta_json", "csv_non_integer_num_frames", "manifest_is_a_directory",
    "min_frames_zero", "non_utf8_yaml", "negative_lr", "log_every_zero", "bad_row_fraction_above_1",
    "bad_row_fraction_below_0", "steps_zero", "out_dir_is_a_file", "unknown_set_key",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_non_zero_naming_file_or_key(sweep, case):
    results, expected = sweep
    result = results[case]
    assert result["code"] != 0, result
    assert "Traceback" not in result["stderr"], result["stderr"]
    # check-data lists row problems on stdout; everything else is one error line on stderr
    lines = result["stdout"].splitlines() + result["stderr"].splitlines()
    assert any(expected[case] in line for line in lines), result


def test_bad_input_in_a_process_of_its_own(tmp_path):
    manifest = tmp_path / "pairs.csv"
    manifest.write_bytes(b"\xff\xfechosen,rejected\n")
    proc = run_cli_process("videodpo.cli", ["check-data", "--manifest", str(manifest)])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"videodpo check-data: error: {manifest}:1: not UTF-8 text (byte 0)"


def test_changed_config_resume_refuses_lists_keys_and_keeps_config_yaml(sweep):
    result = sweep[0]["resume_with_changed_config"]
    err = result["stderr"]
    assert result["code"] == 1 and "Traceback" not in err
    for key in ("loss.kind: 'dpo' -> 'reg_dpo'", "train.batch_size: 2 -> 4", "train.steps: 10 -> 20"):
        assert key in err, err
    assert "train.log_every" not in err  # only what changes a checkpoint's meaning is compared
    assert "--resume-force" in err
    assert result["config_unchanged"]


def test_csv_manifest_with_a_bom_passes_check_data_parsing(tmp_path):
    from videodpo.data.check import check_manifest

    manifest = tmp_path / "clips.csv"
    manifest.write_bytes("\ufeffvideo,caption\nmissing.mp4,a clip\n".encode())
    report = check_manifest(manifest)
    # the BOM did not hide the first column: the problem found is the missing file itself
    assert [(p.field, p.message) for p in report.problems] == [("video", "file not found")]
    assert report.kind == "clip"


def test_set_help_example_names_a_real_key(sweep):
    import re

    from common.config import load_config
    from videodpo.config import RunConfig

    help_text = " ".join(sweep[0]["help"]["stdout"].split())
    example = re.search(r"e\.g\. --set (\S+?);", help_text).group(1)
    load_config(RunConfig, None, [example])  # raises ConfigError on an unknown key
