"""Every bad input of the new-user sweep, through the real `llmpost` CLI: a non-zero exit,
no traceback, and one message naming the file, row or key; plus a refused resume."""

import json

import pytest
import yaml

from llmpost.tasks import write_suite
from tests.cli_cases import run_cli_cases, run_cli_process


def _row(**over):
    row = {"id": "r1", "task": "copy", "category": "sns", "prompt": "copy : a b",
           "reference": "a b", "reward": "exact_match", "meta": {}}
    row.update(over)
    return row


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Writes the inputs, runs every case in one CLI process; returns (results, expected)."""
    root = tmp_path_factory.mktemp("llm_bad")
    paths = write_suite(root / "data", n_train=4, n_eval=2, seed=0)
    base = {"run_dir": str(root / "runs" / "unused"), "model": {"tokenizer": str(root / "tok")},
            "data": {"sns_train": [str(paths["sns_train"])], "general_train": [str(paths["general_train"])],
                     "sns_eval": [str(paths["sns_eval"])], "general_eval": [str(paths["general_eval"])]}}
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(base))

    def run(name, *extra, train=None, evals=None):
        argv = ["run", "--config", str(config), "--set", f"run_dir={root / 'runs' / name}"]
        if train is not None:
            argv += ["--set", f"data.sns_train=[{train}]"]
        if evals is not None:
            argv += ["--set", f"data.sns_eval=[{evals}]", "--set", "data.general_eval=[]"]
        return argv + list(extra)

    latin1 = root / "latin1.jsonl"
    latin1.write_bytes(json.dumps(_row()).encode() + b"\n" + json.dumps(_row(id="r2")).encode()[:-2]
                       + b', "x": "caf\xe9"}\n')
    bad_yaml = root / "latin1.yaml"
    bad_yaml.write_bytes(b"run_dir: caf\xe9\n")
    not_a_dir = root / "a_file"
    not_a_dir.write_text("x")
    no_tokenizer = root / "model_without_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    messages_str = {**_row(), "messages": "hello"}
    del messages_str["prompt"]
    messages_empty = {**messages_str, "messages": []}
    cases = {
        "non_utf8_task_file": (run("a", train=latin1), "latin1.jsonl:2: not UTF-8"),
        "non_utf8_yaml": (["run", "--config", str(bad_yaml)], "latin1.yaml: not UTF-8"),
        "messages_is_a_string": (run("b", train=_jsonl(root / "m1.jsonl", [messages_str])),
                                 "m1.jsonl:1: 'messages' must be a non-empty list"),
        "messages_is_empty": (run("c", train=_jsonl(root / "m2.jsonl", [messages_empty])),
                              "m2.jsonl:1: 'messages' must be a non-empty list"),
        "json_scalar_row": (run("d", train=_jsonl(root / "s.jsonl", [_row(), 42])),
                            "s.jsonl:2: expected a JSON object, got a JSON int"),
        "task_file_is_a_directory": (run("e", train=root / "data"), "data: task file is a directory"),
        "misspelled_reward": (run("f", train=_jsonl(root / "r.jsonl", [_row(reward="exct_match")])),
                              "r.jsonl:1: reward 'exct_match' is not registered"),
        "reference_null": (run("g", train=_jsonl(root / "n.jsonl", [_row(reference=None)])),
                           "n.jsonl:1: 'reference' must be a string, got null"),
        "meta_is_a_list": (run("h", train=_jsonl(root / "l.jsonl", [_row(meta=["a"])])),
                           "l.jsonl:1: 'meta' must be a JSON object, got list"),
        "code_meta_wrong_type": (
            run("i", train=_jsonl(root / "c.jsonl", [_row(reward="code", meta={"timeout_s": "5"})])),
            "c.jsonl:1: meta.timeout_s must be int or float"),
        "negative_lr": (run("j", "--set", "stage1.lr=-1e-4"), "--set stage1.lr=-1e-4: key 'stage1.lr'"),
        "steps_zero": (run("k", "--set", "stage2.steps=0"), "key 'stage2.steps' expects a value >= 1"),
        "fraction_out_of_range": (run("l", "--set", "stage1.general_fraction=1.5"),
                                  "key 'stage1.general_fraction' expects a value in [0,1]"),
        "unknown_set_key": (run("m", "--set", "stage1.lrr=1"), "--set stage1.lrr=1: unknown key 'stage1.lrr'"),
        "unknown_set_section": (run("n", "--set", "rewardz.x=1"), "--set rewardz.x=1: unknown key 'rewardz'"),
        "run_dir_is_a_file": (["run", "--config", str(config), "--set", f"run_dir={not_a_dir}"],
                              "run_dir: " + str(not_a_dir) + " is a file"),
        "empty_eval_set": (run("o", evals=_jsonl(root / "empty.jsonl", [])), "no eval rows"),
        "eval_before_any_stage": (["eval", "--config", str(config), "--set", f"run_dir={root / 'runs' / 'p'}"],
                                  "no model to evaluate yet"),
        "eval_model_without_tokenizer": (["eval", "--config", str(config), "--model", str(no_tokenizer)],
                                         "model_without_tokenizer has no tokenizer"),
        "eval_checks_rewards_too": (
            ["eval", "--config", str(config), "--set",
             f"data.sns_eval=[{_jsonl(root / 'er.jsonl', [_row(reward='nope')])}]"],
            "er.jsonl:1: reward 'nope' is not registered"),
    }
    # A run whose stage 1 has begun (a checkpoint), resumed with other stage-1 settings.
    from common.config import load_config, save_config
    from llmpost.config import PipelineConfig

    run_dir = root / "runs" / "resumed"
    saved = save_config(load_config(PipelineConfig, None, [f"run_dir={run_dir}", "stage1.steps=4"]), run_dir)
    ckpt = run_dir / "stage1" / "checkpoints" / "step_000000002"
    ckpt.mkdir(parents=True)
    (ckpt / "complete.json").write_text('{"step": 2, "world_size": 1}')
    changed = root / "changed.yaml"
    changed.write_text(yaml.safe_dump({"run_dir": str(run_dir), "stage1": {"steps": 8, "group_size": 4},
                                       "data": {"sns_train": ["x.jsonl"]}}))
    cases["resume_with_changed_config"] = (["run", "--config", str(changed)], "would resume")
    before = saved.read_bytes()
    cases["help"] = (["run", "--help"], "--set")
    results = run_cli_cases("llmpost.cli", {k: [str(a) for a in v[0]] for k, v in cases.items()}, root)
    results["resume_with_changed_config"]["config_unchanged"] = saved.read_bytes() == before
    return results, {k: v[1] for k, v in cases.items()}


CASES = [
    "non_utf8_task_file", "non_utf8_yaml", "messages_is_a_string", "messages_is_empty",
    "json_scalar_row", "task_file_is_a_directory", "misspelled_reward", "reference_null",
    "meta_is_a_list", "code_meta_wrong_type", "negative_lr", "steps_zero", "fraction_out_of_range",
    "unknown_set_key", "unknown_set_section", "run_dir_is_a_file", "empty_eval_set",
    "eval_before_any_stage", "eval_model_without_tokenizer", "eval_checks_rewards_too",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_file_or_key(sweep, case):
    results, expected = sweep
    result = results[case]
    assert result["code"] != 0, result
    assert "Traceback" not in result["stderr"], result["stderr"]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("llmpost ")]
    assert len(errors) == 1, result["stderr"]
    assert expected[case] in errors[0], errors[0]


def test_bad_input_in_a_process_of_its_own(tmp_path):
    bad = tmp_path / "cfg.yaml"
    bad.write_text("stage1:\n  lr: -1\n")
    proc = run_cli_process("llmpost.cli", ["run", "--config", str(bad)])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"llmpost run: error: {bad}: key 'stage1.lr' expects a value > 0, got -1.0"


def test_changed_config_resume_refuses_lists_keys_and_keeps_config_yaml(sweep):
    result = sweep[0]["resume_with_changed_config"]
    err = result["stderr"]
    assert result["code"] == 1 and "Traceback" not in err
    assert "stage 1 would resume with a different config" in err
    for key in ("stage1.steps: 4 -> 8", "stage1.group_size: 8 -> 4", "data.sns_train: [] -> ['x.jsonl']"):
        assert key in err, err
    assert "--resume-force" in err
    assert result["config_unchanged"]


def test_set_help_example_names_a_real_key(sweep):
    import re

    from common.config import load_config
    from llmpost.config import PipelineConfig

    help_text = " ".join(sweep[0]["help"]["stdout"].split())
    example = re.search(r"e\.g\. --set (\S+?);", help_text).group(1)
    load_config(PipelineConfig, None, [example])  # raises ConfigError on an unknown key
