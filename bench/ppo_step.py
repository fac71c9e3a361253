"""bench/ppo_step.py: seconds per PPO step, ppo.py against TRL's last PPO trainer, split by phase; and the peak memory
of a PPO step against a GRPO step on the same model.

TRL's PPO: `trl.experimental.ppo.PPOTrainer`, last shipped in trl 1.12.0 (removed in 1.13.0: trl 1.13-1.16 have no
PPO trainer at all). It is never a dependency of the project; install it in an environment of its own:

    python -m venv --system-site-packages .venv-trl && .venv-trl/bin/pip install trl==1.12.0
    .venv-trl/bin/python bench/ppo_step.py --out ppo_step_cpu.md      # toy and 100m, TRL too (~20 min on 2 busy cores)
    python bench/ppo_step.py --no-trl --memory                          # ours only, plus the PPO vs GRPO memory table

One step, the same work on both sides (classic RLHF, four models):
    models        the policy; a frozen reference (its copy); a reward model (AutoModelForSequenceClassification, one
                  output, random weights of the policy's shape); a critic initialised from the reward model
    batch         R prompts of the built-in arithmetic task through the chat template, one sample each (TRL's PPO
                  has no groups), up to N new tokens at temperature 1, no top-k/top-p, stop at EOS
    rewards       the reward model's score at the last token, k1 KL in the reward with beta 0.05, no EOS penalty
    update        GAE (gamma 1, lam 0.95), whitened advantages, `--epochs` epochs of one minibatch (one optimizer
                  step each), clip 0.2, value clip 0.2, AdamW at the same learning rate for policy and critic
    TRL settings  per_device_train_batch_size = R, num_mini_batches 1, local_rollout_forward_batch_size R,
                  gradient_checkpointing off (TRL's default is on), num_sample_generations 0, fp32 on CPU
Phases. Ours: ppo.main's per-step perf/*_s (generate, reward = the reward model, policy / reference / critic passes,
update). TRL: its module functions wrapped with timers: batch_generation (generate; it keeps the sampling logits,
so it needs no policy pass), forward on the reference (reference pass), get_reward on the critic (critic pass) and
on the reward model (reward); update = the rest of the step. The first `--warmup` steps of each run are dropped;
runs alternate (ours, TRL, TRL, ours) and the headline is the median over rounds of each round's TRL / ours ratio.

Models (Qwen2, the toy tokenizer): toy = the committed toy base model (0.8M), 100m = hidden 768, 12 layers, vocabulary
32,768, random (it never samples EOS, so every row runs N tokens on both sides).
--memory: the peak resident memory of a fresh process running 3 steps of ppo.py (the `ppo` preset: policy +
critic; and `rlhf`: + reference + reward model) and of grpo.py (policy only), each on the same model and batch.
Target (issue 14): TRL / ours >= 1.5x per step on this CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppo  # noqa: E402
import rl_kernels as K  # noqa: E402
import rl_runs as runs  # noqa: E402
import rlvr_rewards as env  # noqa: E402
from grpo_step import make_model_dir, median  # noqa: E402

SIZES = {"toy": (64, 48, 4), "100m": (16, 32, 3)}  # R rows, N new tokens, timed steps
PHASES = ("generate", "reward", "policy_pass", "reference_pass", "critic_pass", "update", "step")


@dataclass
class Args:
    models: tuple[str, ...] = ("toy", "100m")
    """toy | 100m"""
    epochs: int = 1
    """PPO epochs per rollout on both sides (the update scales with it; the other phases do not)"""
    warmup: int = 1
    """steps dropped at the start of every run"""
    rounds: int = 2
    """runs per side, alternating which goes first"""
    trl: bool = True
    """also time TRL's PPOTrainer (trl 1.12.0 in its own environment, see the docstring)"""
    memory: bool = False
    """also measure the peak memory of a PPO step against a GRPO step (fresh processes)"""
    lr: float = 1e-5
    """learning rate of both sides (irrelevant to the timing)"""
    threads: int = 1
    """torch CPU threads for both sides"""
    out: str | None = None
    """also write the markdown to this file"""
    seed: int = 0


def make_reward_model_dir(policy_dir: str, root: str, seed: int) -> str:
    """A random one-output AutoModelForSequenceClassification of the policy's shape (the reward model, and the
    critic's starting point on both sides)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(policy_dir, num_labels=1)
    torch.manual_seed(seed + 1)
    path = os.path.join(root, f"rm-{os.path.basename(policy_dir)}")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    K.load_tokenizer(policy_dir).save_pretrained(path)
    return path


def ppo_args(path: str, rm: str, size: tuple, args: Args, out_dir: str, steps: int, preset: str = "rlhf") -> ppo.Args:
    R, N, _ = size
    return ppo.Args(model=path, preset=preset, reward_model=rm, out_dir=out_dir, seed=args.seed, max_steps=steps,
                    lr=args.lr, critic_lr=args.lr, warmup_steps=1, eval_every=0, device="cpu", prompts_per_step=R,
                    num_generations=1, max_new_tokens=N, num_epochs=args.epochs,
                    num_minibatches=1, missing_eos_score=float("nan"), threads=args.threads, plot=False)


def run_ours(path, rm, size, args, out_dir) -> list[dict]:
    real_save, ppo.save = ppo.save, lambda *a, **k: out_dir  # the final checkpoint is not part of a step
    try:
        ppo.main(ppo_args(path, rm, size, args, out_dir, args.warmup + size[2]))
    finally:
        ppo.save = real_save
    rows = [r for r in runs.read_metrics(out_dir) if "perf/step_s" in r]
    return [{p: r.get(f"perf/{p}_s", 0.0) for p in PHASES} for r in rows[args.warmup:]]


def run_trl(path, rm, size, args, out_dir) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    R, N, steps = size
    tokenizer = K.load_tokenizer(path)
    rows = env.make_dataset("arithmetic", "train", n=R * (args.warmup + steps + 2), seed=args.seed)
    texts = [env.render_prompt(tokenizer, r["prompt"]) for r in rows]
    data = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]})
    config = PPOConfig(output_dir=out_dir, per_device_train_batch_size=R, gradient_accumulation_steps=1,
                       num_mini_batches=1, local_rollout_forward_batch_size=R, total_episodes=R * (args.warmup + steps),
                       response_length=N, temperature=1.0, stop_token="eos", missing_eos_penalty=None,
                       num_ppo_epochs=args.epochs, kl_coef=0.05, kl_estimator="k1", cliprange=0.2,
                       cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False,
                       learning_rate=args.lr, num_sample_generations=0, gradient_checkpointing=False, bf16=False,
                       fp16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                       disable_tqdm=True, seed=args.seed, dataloader_num_workers=0)
    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    critic = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    current, out = {}, []

    def timed(fn, phase_of):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phase = phase_of(*a)
                if phase:
                    current[phase] = current.get(phase, 0.0) + time.perf_counter() - t0
        return wrapper

    module.batch_generation = timed(module.batch_generation, lambda *a: "generate")
    module.forward = timed(module.forward, lambda model, *a: "reference_pass" if model is ref else None)
    module.get_reward = timed(module.get_reward, lambda model, *a: "reward" if model is reward_model
                              else "critic_pass")

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            current["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            step = now - current.pop("t0")
            phases = {p: current.pop(p, 0.0) for p in PHASES[:-2]}
            out.append({**phases, "update": step - sum(phases.values()), "step": step})
            current.clear()
            current["t0"] = now

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref,
                         reward_model=reward_model, value_model=critic, train_dataset=data, eval_dataset=data,
                         callbacks=[StepTimer()])
    trainer.train()
    return out[args.warmup:]


def peak_memory_mb(code: str) -> float:
    """Peak resident memory (MB) of a fresh Python process running `code`."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(Path(__file__).resolve().parents[1]),
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return usage.ru_maxrss / 1024


def memory_table(name: str, path: str, rm: str, size: tuple, args: Args, root: str) -> list[str]:
    R, N, _ = size
    runs = {"grpo.py (policy)": f"import grpo; grpo.main(grpo.Args(model={path!r}, out_dir={root + '/m-grpo'!r}, "
                                f"max_steps=3, eval_every=0, prompts_per_step={R}, num_generations=1, "
                                f"max_new_tokens={N}, advantage='batch', lr={args.lr}, plot=False))"}
    for preset, held in (("ppo", "policy + critic"), ("rlhf", "policy + critic + reference + reward model")):
        a = ppo_args(path, rm, size, args, f"{root}/m-{preset}", 3, preset)
        runs[f"ppo.py --preset {preset} ({held})"] = f"import ppo, math; nan = math.nan; ppo.main(ppo.{a!r})"
    lines = [f"#### Peak memory, {name}: R = {R} rows, N = {N}, 3 steps in a fresh process", "",
             "| run | peak RSS MB |", "|---|---|"]
    for label, code in runs.items():
        try:
            lines.append(f"| {label} | {peak_memory_mb(code):,.0f} |")
        except Exception as error:  # one failing run must not cost the others their numbers
            lines.append(f"| {label} | FAILED: {str(error)[-200:]} |")
    return lines + [""]


def main(args: Args):
    import transformers

    transformers.logging.set_verbosity_error()
    if args.trl:
        try:
            import trl
            from trl.experimental.ppo import PPOTrainer  # noqa: F401
        except ImportError:
            raise SystemExit("TRL's PPOTrainer is not importable: install trl==1.12.0 in its own environment (see "
                             "the docstring), or pass --no-trl.") from None
    torch.set_num_threads(args.threads)
    header = (f"### PPO step: ppo.py vs TRL PPOTrainer (CPU, {args.threads} thread(s))\n\n`python bench/ppo_step.py "
              f"{' '.join(sys.argv[1:])}`: torch {torch.__version__}, transformers {transformers.__version__}, TRL "
              f"{trl.__version__ if args.trl else '(not run)'}; {args.rounds} round(s), {args.warmup} warm-up step(s) "
              f"dropped per run; {args.epochs} PPO epoch(s) per rollout; seconds per step, medians over kept steps.\n")
    lines = [header, "| model | side | " + " | ".join(PHASES) + " | TRL / ours |", "|---|---|" + "---|" * len(PHASES) + "---|"]
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="ppo_step_") as root:
        for name in args.models:
            path, _ = make_model_dir(name, root, args.seed)
            rm = make_reward_model_dir(path, root, args.seed)
            size, results = SIZES[name], {"ours": [], "trl": []}
            for r in range(args.rounds):
                for side in (["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]):
                    if side == "trl" and not args.trl:
                        continue
                    print(f"== {name}: {side}, round {r + 1}", flush=True)
                    torch.set_num_threads(args.threads)
                    try:
                        steps = (run_ours if side == "ours" else run_trl)(path, rm, size, args, f"{root}/{name}-{side}-{r}")
                    except Exception:
                        traceback.print_exc()
                        steps = []
                    results[side].append(steps)
                    print("   step s:", [round(s["step"], 3) for s in steps], flush=True)
            ratios = [median([s["step"] for s in t]) / median([s["step"] for s in o])
                      for o, t in zip(results["ours"], results["trl"]) if o and t]
            for side, label in (("ours", "ppo.py"), ("trl", "TRL PPOTrainer")):
                kept = [s for run in results[side] for s in run]
                if kept:
                    cells = " | ".join(f"{median([s[p] for s in kept]):.3f}" for p in PHASES)
                    ratio = f"**{median(ratios):.2f}x** (rounds: {', '.join(f'{x:.2f}' for x in ratios)})" \
                        if side == "trl" and ratios else ""
                    lines.append(f"| {name} (R = {size[0]}, N = {size[1]}) | {label} | {cells} | {ratio} |")
        if args.memory:
            lines.append("")
            for name in args.models:
                path, _ = make_model_dir(name, root, args.seed)
                lines += memory_table(name, path, make_reward_model_dir(path, root, args.seed), SIZES[name], args, root)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
