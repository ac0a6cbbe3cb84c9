"""`python tools/dapo_bench.py [--quick] --out DIR`: DAPO step throughput of the project's
loop, with HF `generate` rollouts and with vLLM rollouts, against TRL's
`GRPOTrainer(loss_type="dapo")`, on one workload.

Every system gets the same tiny Qwen3 (2 layers, hidden 128, 2 heads of 64), the same
chat-templated prompts of the synthetic tasks, the project's exact-match reward, group
size 8, 16 prompts a step, 8 new tokens, temperature 1, lr 2e-4, clip 0.2 / 0.28, no KL,
no dynamic sampling and one update per rollout, on one thread. Each run is a fresh
process (`--worker`), runs alternate between systems within one invocation, and the
figures are medians of the per-step times after each run's warm-up steps. A longer
workload (64 prompts x 8 x 64 tokens) compares the two rollout back-ends.

TRL is not a project dependency: the tool installs TRL 1.16 into its own environment,
`DIR/../dapo-bench-env` by default, layered on the project's .venv (a `.pth` file makes
the project's torch / transformers visible; .venv itself is never changed).

Writes `DIR/results.json` (`steps_per_s`, `tokens_per_s`, `ratio_vs_trl`,
`vllm_vs_hf_tokens`, the raw step times, and the differences between the systems
that could not be removed) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRL_VERSION = "1.16.0"
GROUP = 8
WORKLOADS = {  # prompts per step, new tokens
    "quick": {"prompts": 16, "new_tokens": 8},
    "long": {"prompts": 64, "new_tokens": 64},
}
DIFFERENCES = [
    "TRL runs inside transformers' Trainer (dataloader, callbacks, logging of its metrics "
    "each step); the project's loop logs its own per-task metrics each step.",
    "TRL tokenizes the chat-templated prompt text itself and left-pads it; the project "
    "encodes the same text with the same tokenizer (identical ids, different code path).",
    "With one update per rollout TRL takes the old log-probs as the detached current ones; "
    "the project's HF path takes them from the logits generate returned (no extra forward).",
    "The project's vLLM path syncs the weights into the engine and runs one extra policy "
    "forward each step (the old log-probs and the engine/policy gap metrics).",
    "Sampling RNG streams differ between the systems, so responses (and their lengths) "
    "differ; tokens_per_s counts each system's own generated tokens.",
    "The model starts untrained, so exact-match rewards are all 0 and advantages 0 on every "
    "system: the update runs in full but does not move the weights much.",
]


# ------------------------------------------------------------------------------ assets


def prepare_assets(out: Path) -> Path:
    """Tokenizer, tiny Qwen3 and task files under `out/assets` (made once)."""
    from llmpost.model import tiny_qwen3
    from llmpost.tasks import vocabulary_words, write_suite
    from llmpost.tokenizer import train_tokenizer

    assets = out / "assets"
    if (assets / "model" / "config.json").exists():
        return assets
    tokenizer = train_tokenizer([" ".join(vocabulary_words())])
    model = tiny_qwen3(len(tokenizer), hidden_size=128, num_layers=2, num_heads=2,
                       num_kv_heads=1, intermediate_size=256, max_positions=256,
                       pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, seed=0)
    model.save_pretrained(str(assets / "model"))
    tokenizer.save_pretrained(str(assets / "model"))
    write_suite(assets / "data", n_train=200, n_eval=1, seed=0)
    return assets


def load_records(assets: Path) -> list:
    """Every train row of the suite, scored by exact match."""
    from llmpost.data import load_many

    rows = load_many([assets / "data" / "sns_train.jsonl", assets / "data" / "general_train.jsonl"])
    return [replace(r, reward="exact_match") for r in rows]


# ----------------------------------------------------------------------------- workers


def project_worker(assets: Path, backend: str, workload: dict, steps: int, result: Path) -> None:
    import torch

    from llmpost.config import DapoConfig, GenerationConfig
    from llmpost.dapo_trainer import train_dapo
    from llmpost.model import load_model
    from llmpost.rewards import default_registry
    from llmpost.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    model_dir = assets / "model"
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    n_seq = workload["prompts"] * GROUP
    cfg = DapoConfig(
        steps=steps, prompts_per_step=workload["prompts"], group_size=GROUP, lr=2e-4,
        general_fraction=0.0, dynamic_sampling=False, epochs=1, mini_batches=1,
        eps_low=0.2, eps_high=0.28, kl_coef=0.0, save_every=10**9,
        generation=GenerationConfig(temperature=1.0, max_new_tokens=workload["new_tokens"],
                                    backend=backend, batch_size=n_seq),
    )
    stage = result.parent / f"{result.stem}-stage"
    shutil.rmtree(stage, ignore_errors=True)  # a fresh stage, never a resumed one
    cpu_marks = [time.process_time()]  # step ends: CPU time of this process (all its threads)
    train_dapo(model, tokenizer, load_records(assets), [], cfg, default_registry(), stage,
               seed=0, model_path=model_dir,
               on_step=lambda step, metrics: cpu_marks.append(time.process_time()))
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    result.write_text(json.dumps({
        "step_s": [r["step_time_s"] for r in rows],
        "cpu_s": [b - a for a, b in zip(cpu_marks, cpu_marks[1:])],
        "tokens": [r["tokens_per_s"] * r["step_time_s"] for r in rows],
    }))


def trl_worker(assets: Path, workload: dict, steps: int, result: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmpost.model import load_model
    from llmpost.rewards import default_registry
    from llmpost.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    model_dir = assets / "model"
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    records = load_records(assets)
    exact = default_registry().get("exact_match")
    rows = [{"prompt": tokenizer.apply_chat_template(r.chat(), tokenize=False,
                                                     add_generation_prompt=True),
             "reference": r.reference} for r in records]

    def exact_match(prompts, completions, reference, **kwargs):
        return [float(exact(p, c.strip(), ref)) for p, c, ref in zip(prompts, completions, reference)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.cpu_s: list[float] = []
            self.lengths: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.t0)
            self.cpu_s.append(time.process_time() - self.c0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    n_seq = workload["prompts"] * GROUP
    args = GRPOConfig(
        output_dir=str(result.parent / f"{result.stem}-trl"), loss_type="dapo",
        per_device_train_batch_size=n_seq, gradient_accumulation_steps=1,
        num_generations=GROUP, steps_per_generation=1, num_iterations=1,
        max_completion_length=workload["new_tokens"], temperature=1.0, top_p=1.0,
        learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, epsilon=0.2, epsilon_high=0.28, beta=0.0, optim="adamw_torch",
        max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, log_completions=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[timer])
    trainer.train()
    lengths = timer.lengths + [timer.lengths[-1]] * (len(timer.step_s) - len(timer.lengths))
    result.write_text(json.dumps({
        "step_s": timer.step_s, "cpu_s": timer.cpu_s,
        "tokens": [n_seq * m for m in lengths[: len(timer.step_s)]],
    }))


# ------------------------------------------------------------------------------ driver


def trl_python(env_dir: Path) -> Path:
    """The python of the bench environment, with TRL installed (created on first use)."""
    python = env_dir / "bin" / "python"
    check = [str(python), "-c", f"import trl; assert trl.__version__ == '{TRL_VERSION}'"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"[bench] installing TRL {TRL_VERSION} into {env_dir} (layered on {sys.prefix})")
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    import site

    site_dir = next(Path(p) for p in site.getsitepackages() if p.endswith("site-packages"))
    pth = next((env_dir / "lib").glob("python*/site-packages")) / "regpost_venv.pth"
    pth.write_text(str(site_dir) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)
    subprocess.run(check, check=True)
    return python


def run_worker(python: Path, system: str, assets: Path, workload: str, steps: int,
               result: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", system, "--assets",
           str(assets), "--workload", workload, "--steps", str(steps), "--result", str(result)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} worker failed:\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - t0
    return out


def summarize(runs: list[dict], warmup: int) -> dict:
    """Medians after warm-up. Wall-clock figures, and the same from the process's CPU time
    (one thread: equal to wall time on an idle machine, and much less disturbed by other
    processes on a shared one)."""
    step_s = [t for r in runs for t in r["step_s"][warmup:]]
    cpu_s = [t for r in runs for t in r["cpu_s"][warmup:]]
    tokens = [n for r in runs for n in r["tokens"][warmup:]]
    median, median_cpu = statistics.median(step_s), statistics.median(cpu_s)
    return {
        "steps_measured": len(step_s), "median_step_s": median, "steps_per_s": 1.0 / median,
        "tokens_per_s": statistics.median([n / t for n, t in zip(tokens, step_s)]),
        "median_cpu_s": median_cpu, "steps_per_cpu_s": 1.0 / median_cpu,
        "tokens_per_cpu_s": statistics.median([n / t for n, t in zip(tokens, cpu_s)]),
        "step_s": step_s, "cpu_s": cpu_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output directory (required)")
    parser.add_argument("--quick", action="store_true",
                        help="3 alternating rounds of 2 warm-up + 7 steps (quick workload); "
                             "1 round of 1 + 5 on the long one")
    parser.add_argument("--rounds", type=int, help="alternating rounds per system")
    parser.add_argument("--steps", type=int, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out at each run's start")
    parser.add_argument("--systems", default="hf,vllm,trl", help="which systems (comma list)")
    parser.add_argument("--env", help="TRL environment (default OUT/../dapo-bench-env)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        work, result, assets = WORKLOADS[args.workload], Path(args.result), Path(args.assets)
        if args.worker == "trl":
            trl_worker(assets, work, args.steps, result)
        else:
            project_worker(assets, args.worker, work, args.steps, result)
        return 0

    if not args.out:
        parser.error("--out DIR is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    systems = [s for s in args.systems.split(",") if s]
    rounds = args.rounds or (3 if args.quick else 4)
    steps = args.steps or (7 if args.quick else 10)
    assets = prepare_assets(out)
    pythons = {"hf": Path(sys.executable), "vllm": Path(sys.executable)}
    if "trl" in systems:
        pythons["trl"] = trl_python(Path(args.env) if args.env else out.parent / "dapo-bench-env")
    plan = {"quick": (systems, rounds, steps, args.warmup),
            "long": ([s for s in systems if s != "trl"], 1 if args.quick else 2,
                     5 if args.quick else 10, 1)}
    results: dict = {"workloads": WORKLOADS, "group_size": GROUP, "threads": 1,
                     "cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
                     "differences": DIFFERENCES, "runs": {}}
    for workload, (names, n_rounds, n_steps, warmup) in plan.items():
        runs: dict[str, list[dict]] = {s: [] for s in names}
        for r in range(n_rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # alternate who goes first
            for system in order:
                res = out / "work" / f"{workload}-{system}-{r}.json"
                res.parent.mkdir(parents=True, exist_ok=True)
                print(f"[bench] {workload} round {r + 1}/{n_rounds}: {system}", flush=True)
                runs[system].append(run_worker(pythons[system], system, assets, workload,
                                               n_steps + warmup, res))
        results["runs"][workload] = {s: {**summarize(v, warmup),
                                         "wall_s": [x["wall_s"] for x in v]}
                                     for s, v in runs.items()}
    quick = results["runs"]["quick"]
    results["steps_per_s"] = {s: v["steps_per_s"] for s, v in quick.items()}
    results["tokens_per_s"] = {s: v["tokens_per_s"] for s, v in quick.items()}
    results["load_average_end"] = os.getloadavg()
    for suffix in ("", "_cpu"):  # wall clock, then CPU time
        per = "per_s" if not suffix else "per_cpu_s"
        if "hf" in quick and "trl" in quick:
            results[f"ratio_vs_trl{suffix}"] = quick["hf"][f"steps_{per}"] / quick["trl"][f"steps_{per}"]
        if "hf" in quick and "vllm" in quick:
            results[f"vllm_vs_hf_tokens{suffix}"] = {
                w: results["runs"][w]["vllm"][f"tokens_{per}"] / results["runs"][w]["hf"][f"tokens_{per}"]
                for w in ("quick", "long") if {"hf", "vllm"} <= set(results["runs"][w])}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"results: {out / 'results.json'}")
    return 0


def format_table(results: dict) -> str:
    lines = [f"{'workload':9s}{'system':8s}{'steps':>6s}{'wall s/step':>12s}{'steps/s':>8s}"
             f"{'tokens/s':>9s}{'CPU s/step':>11s}{'steps/CPU s':>12s}{'tokens/CPU s':>13s}"]
    for workload, systems in results["runs"].items():
        for system, v in systems.items():
            lines.append(f"{workload:9s}{system:8s}{v['steps_measured']:>6d}"
                         f"{v['median_step_s']:>12.3f}{v['steps_per_s']:>8.2f}"
                         f"{v['tokens_per_s']:>9.0f}{v['median_cpu_s']:>11.3f}"
                         f"{v['steps_per_cpu_s']:>12.2f}{v['tokens_per_cpu_s']:>13.0f}")
    for suffix, label in (("", "wall"), ("_cpu", "CPU time")):
        if f"ratio_vs_trl{suffix}" in results:
            lines.append(f"ratio_vs_trl ({label}; project HF steps/s / TRL steps/s): "
                         f"{results[f'ratio_vs_trl{suffix}']:.2f}")
        for w, x in results.get(f"vllm_vs_hf_tokens{suffix}", {}).items():
            lines.append(f"vllm_vs_hf_tokens ({label}, {w}): {x:.2f}")
    lines.append(f"load average at start / end: {results['load_average_start'][0]:.1f} / "
                 f"{results['load_average_end'][0]:.1f} on {results['cpus']} CPUs")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
