"""bench/grpo_step.py: seconds per GRPO training step, grpo.py against TRL's GRPOTrainer, split by phase.

One step = sample G completions for each of B prompts, score them, compute advantages, one optimizer step.
Both sides do the same work:

    same weights and dtype       one random-initialised (or the committed toy) Qwen2 directory, loaded by each side
    same prompts                 the built-in arithmetic task through the tokenizer's chat template
    same batch                   B prompts x G samples = B*G rows per step, all generated in one call
    same lengths and sampling    max N new tokens, temperature 1, top-p 1, no top-k, EOS on (see below)
    same rewards                 rlvr_rewards.accuracy_reward (weight 1) + format_reward (weight 0.1)
    same update                  one optimizer step per rollout (mu = 1, one minibatch, no gradient
                                 accumulation), no reference model (beta = 0), no KL, GRPO's
                                 seq-mean-token-mean loss, clip 0.2, grad-norm clip 1.0, AdamW (each side's
                                 default implementation: torch's for-loop one on CPU for grpo.py, the fused one
                                 for TRL, through transformers' default optim "adamw_torch_fused")
    TRL settings                 per_device_train_batch_size = B*G, steps_per_generation = 1, num_iterations = 1,
                                 gradient_accumulation_steps = 1, beta = 0, loss_type "grpo", no vLLM,
                                 gradient_checkpointing off (TRL's default is on: it would add a forward),
                                 bf16 only on GPU, report_to none, save_strategy no, logging_steps 1.

EOS cannot be switched off in grpo.py from outside, so both sides stop a row at EOS and stop the batch when every
row has stopped. A random-initialised model almost never makes every row stop early (with the 32k and 152k
vocabularies it practically never samples EOS), so both sides decode N steps each call; the table reports the
mean completion length of each side so any difference in work shows.

Timing. Ours: grpo.main(max_steps = warmup + steps, eval_every 0) and its per-step `perf/*_s` from metrics.jsonl
(generate: templating + rl_kernels.generate + decoding; reward; log-prob passes: pi_old / pi_ref recomputation, none
here since mu = 1 and beta = 0; update: forward + backward + optimizer). TRL: trainer.train() with a
TrainerCallback timing on_step_begin -> on_step_end, and its phases by wrapping the trainer's `_generate` (tokenise,
model.generate, decode) and `_calculate_rewards`; the rest of `_generate_and_score_completions` (padding,
advantages; it would hold TRL's pi_old / pi_ref passes) is its "log-probs" column; update = step - rollout.
The first `warmup` steps of every run are discarded (lazy initialisation; on GPU our decode-step compile).
Runs alternate (ours, TRL, TRL, ours, ...) over `rounds`, so a noisy shared machine slows both alike; the tables
give the seconds as medians over every kept step, and the ratio TRL / ours per round (each side's median step in
that round; the two runs of a round are back to back) and its median over the rounds, the headline number.
grpo.main's final checkpoint is skipped (rl_runs.save_checkpoint is swapped for a stub during our runs): saving is
not part of a step and would write gigabytes for the larger models.

Models (all Qwen2, tied embeddings, the toy character-level tokenizer of sft.py; embedding rows beyond the
tokenizer's 105 tokens are never in a prompt and decode to nothing, which is fine for timing):
    toy            toy_world.TOY_BASE when it exists (the trained toy base), else a random model of toy_world.toy_model_config
    100m           hidden 768, 12 layers, 12 heads, 4 KV heads, MLP 2048, vocabulary 32,768: 100.7M parameters
    qwen2.5-0.5b   Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151,936

    python bench/grpo_step.py --quick                         # seconds: toy model, small batch, TRL too
    python bench/grpo_step.py --out grpo_cpu.md               # CPU: toy and 100m (~10 min on 2 busy cores)
    python bench/grpo_step.py --device cuda --out grpo_gpu.md # GPU: 100m and qwen2.5-0.5b, bf16 (bench/gpu_grpo.sh)

TRL is needed only here (`pip install trl`; never a dependency of the project). --no-trl times ours alone.
Targets (issue 5): TRL / ours >= 2 on this CPU, >= 4 on a GPU (TRL without vLLM).
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import rl_kernels as K  # noqa: E402
import rl_runs as runs  # noqa: E402
import rlvr_rewards as env  # noqa: E402
import toy_world as toy  # noqa: E402


@dataclass
class Args:
    device: str = "cpu"
    """cpu or cuda"""
    models: tuple[str, ...] = ()
    """models to run, from toy | 100m | qwen2.5-0.5b (empty: toy with --quick, toy 100m on CPU, qwen2.5-0.5b 100m on CUDA)"""
    prompts: int = 0
    """B prompts per step (0: the model's default in SIZES)"""
    num_generations: int = 0
    """G samples per prompt (0: the model's default)"""
    max_new_tokens: int = 0
    """N, the completion length cap (0: the model's default)"""
    steps: int = 0
    """timed steps per run, after the warm-up (0: the model's default)"""
    warmup: int = 1
    """steps discarded at the start of every run"""
    rounds: int = 0
    """runs per side, alternating which side goes first (0: 2 on CPU, 1 on CUDA and with --quick)"""
    threads: int = 1
    """torch CPU threads for both sides (0: torch's default); 1 gives steadier timings on a busy shared machine"""
    trl: bool = True
    """also time TRL's GRPOTrainer (needs `pip install trl`)"""
    compile: bool | None = None
    """grpo.py's --compile (None: its default, i.e. on CUDA only)"""
    lr: float = 1e-5
    """learning rate of both sides (irrelevant to the timing)"""
    quick: bool = False
    """a fast sanity run: toy model, 4 prompts x 4 samples, 16 tokens, one round of 2 timed steps"""
    out: str | None = None
    """also write the markdown tables to this file (rewritten after every run, so a cut-off run keeps its rows)"""
    seed: int = 0
    """seed of the random weights, the data order and the sampling"""


# Model -> (B prompts, G samples, N new tokens, timed steps), per device. CPU sizes keep a run to a few minutes on
# two cores; GPU sizes are RL-sized batches (128 rows; 64 for 0.5B, whose one-micro-batch update at 128 x 272 tokens
# would need ~50 GB of activations on either side) at a length where decoding dominates, as in real runs.
SIZES = {
    "cpu": {"toy": (16, 8, 48, 4), "100m": (4, 4, 32, 3), "qwen2.5-0.5b": (2, 4, 32, 2)},
    "cuda": {"toy": (16, 8, 48, 4), "100m": (16, 8, 256, 2), "qwen2.5-0.5b": (8, 8, 256, 2)},
    "quick": {"toy": (4, 4, 16, 2), "100m": (2, 2, 8, 1), "qwen2.5-0.5b": (2, 2, 8, 1)},
}
SHAPES = {
    "100m": dict(vocab_size=32768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=2048),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, rope_theta=1e6, rms_norm_eps=1e-6),
}
TARGETS = {"cpu": 2.0, "cuda": 4.0}
PHASES = ("generate", "reward", "logprobs", "update", "step")


# ----------------------------------------------------------------------------------------------------------
# The shared model directory and the shared rewards
# ----------------------------------------------------------------------------------------------------------


def make_model_dir(name: str, root: str, seed: int) -> tuple[str, str]:
    """A transformers checkpoint directory both sides load; returns (path, description)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if name == "toy" and os.path.exists(os.path.join(toy.TOY_BASE, "config.json")):
        return toy.TOY_BASE, "the committed toy base model (toy.TOY_BASE)"
    tokenizer = toy.build_toy_tokenizer()
    if name == "toy":
        config, what = toy.toy_model_config(tokenizer), "random-initialised toy model (toy.toy_model_config)"
    elif name in SHAPES:
        config = Qwen2Config(**SHAPES[name], tie_word_embeddings=True, max_position_embeddings=4096,
                             bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        what = f"random-initialised Qwen2 `{name}`"
    else:
        raise SystemExit(f"Unknown model {name!r}; choose from toy, {', '.join(SHAPES)}.")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    path = os.path.join(root, name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return path, what


def _texts(completions) -> list[str]:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]; our rewards take text."""
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def accuracy(completions, answer, **kwargs):
    return env.accuracy_reward(_texts(completions), answer)


def format_(completions, **kwargs):
    return env.format_reward(_texts(completions))


# ----------------------------------------------------------------------------------------------------------
# The two contestants: one run each returns a list of per-step dicts {phase: seconds, "length": tokens}
# ----------------------------------------------------------------------------------------------------------


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_checkpoints():
    """grpo.main always writes a final checkpoint; it is not part of a step, so skip it while timing."""
    real = runs.save_checkpoint
    runs.save_checkpoint = lambda out_dir, step, *a, name=None, **k: os.path.join(out_dir, name or str(step))
    try:
        yield
    finally:
        runs.save_checkpoint = real


def run_ours(path: str, size: tuple, args: Args, out_dir: str, dtype: str) -> tuple[list[dict], list[float]]:
    B, G, N, steps = size
    run_args = grpo.Args(model=path, dataset="arithmetic", rewards=("task", "format"), reward_weights=(1.0, 0.1),
                         out_dir=out_dir, seed=args.seed, max_steps=args.warmup + steps, lr=args.lr, eval_every=0,
                         device=args.device, dtype=dtype, prompts_per_step=B, num_generations=G,
                         max_new_tokens=N, temperature=1.0, top_p=1.0, compile=args.compile, plot=False)
    with no_checkpoints():
        grpo.main(run_args)
    rows = [r for r in runs.read_metrics(out_dir) if "perf/step_s" in r]
    kept = [{**{p: r.get(f"perf/{p}_s", 0.0) for p in PHASES}, "length": r["rollout/response_length"]}
            for r in rows[args.warmup:]]
    return kept, [r["perf/step_s"] for r in rows[:args.warmup]]


def run_trl(path: str, size: tuple, args: Args, out_dir: str, dtype: torch.dtype) -> tuple[list[dict], list[float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    B, G, N, steps = size
    gpu = args.device == "cuda"
    rows = env.make_dataset("arithmetic", "train", n=max(256, 4 * B * (args.warmup + steps)), seed=args.seed)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                              for r in rows])
    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=B * G, gradient_accumulation_steps=1, num_generations=G,
        steps_per_generation=1, num_iterations=1, max_completion_length=N, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2, reward_weights=[1.0, 0.1],
        learning_rate=args.lr, max_grad_norm=1.0, max_steps=args.warmup + steps, logging_steps=1, report_to="none",
        save_strategy="no", gradient_checkpointing=False, bf16=gpu, fp16=False, use_cpu=not gpu, seed=args.seed,
        disable_tqdm=True, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = K.load_tokenizer(path)
    steps_out: list[dict] = []
    current: dict = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            current.clear()
            current.update(generate=0.0, reward=0.0, rollout=0.0)
            synchronize()
            current["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            synchronize()
            current["step"] = time.perf_counter() - current.pop("t0")
            steps_out.append(dict(current))

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs and steps_out:
                steps_out[-1]["length"] = logs["completions/mean_length"]

    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, format_], args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # logging_steps 1 would print every step's dict

    def timed(method, phase):
        def wrapper(*a, **k):
            synchronize()
            t0 = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                synchronize()
                current[phase] = current.get(phase, 0.0) + time.perf_counter() - t0
        return wrapper

    # Phase split: instance attributes shadow the methods the trainer calls on itself (private names; if a TRL
    # version renames them, the split shows as 0 and the step total is still right).
    for method, phase in (("_generate", "generate"), ("_calculate_rewards", "reward"),
                          ("_generate_and_score_completions", "rollout")):
        if hasattr(trainer, method):
            setattr(trainer, method, timed(getattr(trainer, method), phase))
    trainer.train()
    out = []
    for s in steps_out[args.warmup:]:
        rollout = s["rollout"]
        out.append(dict(generate=s["generate"], reward=s["reward"], logprobs=max(0.0, rollout - s["generate"] - s["reward"]),
                        update=s["step"] - rollout if rollout else 0.0, step=s["step"], length=s.get("length", float("nan"))))
    del trainer, model
    return out, [s["step"] for s in steps_out[:args.warmup]]


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def model_table(result: dict, args: Args) -> str:
    B, G, N, steps = result["size"]
    lines = [f"#### {result['name']}: {result['what']}, {result['params'] / 1e6:.1f}M parameters, "
             f"{result['dtype']}; B = {B} prompts x G = {G} samples = {B * G} rows, N = {N} new tokens",
             "", "| side | generate s | reward s | log-prob passes s | update s | **step s** | step min-max | "
                 "completion length | steps | warm-up step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, side in (("grpo.py", "ours"), ("TRL GRPOTrainer", "trl")):
        kept = [s for run in result[side] for s in run]
        if not kept:
            continue
        cells = [f"{median([s[p] for s in kept]):.3f}" for p in PHASES[:-1]]
        step = [s["step"] for s in kept]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{median(step):.3f}** | {min(step):.3f}-"
                     f"{max(step):.3f} | {median([s['length'] for s in kept]):.1f} | {len(kept)} | "
                     + ", ".join(f"{w:.1f}" for w in result[f"{side}_warm"]) + " |")
    ratio = result_ratio(result)
    if ratio is not None:
        per_round = round_ratios(result)
        target = TARGETS.get(args.device)
        verdict = "" if args.quick or target is None else \
            f" (target >= {target:g}x: {'met' if ratio >= target else 'MISSED'})"
        lines += ["", f"TRL / ours (median over rounds of each round's median-step ratio): **{ratio:.2f}x**{verdict}; "
                  "per round: " + ", ".join(f"{r:.2f}x" for r in per_round) + "."]
    lines += [f"\nFAILED: {error}" for error in result["errors"]]
    return "\n".join(lines) + "\n"


def round_ratios(result: dict) -> list[float]:
    """Per round: TRL's median step / ours' median step, the two runs made back to back."""
    return [median([s["step"] for s in t]) / median([s["step"] for s in o])
            for o, t in zip(result["ours"], result["trl"]) if o and t]


def result_ratio(result: dict):
    """The headline ratio: the median over rounds of the paired ratios (a machine whose load drifts between rounds
    moves both runs of a round alike, but not the pooled medians)."""
    ratios = round_ratios(result)
    return median(ratios) if ratios else None


def markdown(results: list[dict], args: Args, header: str) -> str:
    parts = [header, "", "| model | params | B x G | N | grpo.py s/step | TRL s/step | TRL / ours | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        B, G, N, _ = r["size"]
        ours = median([s["step"] for run in r["ours"] for s in run])
        theirs = median([s["step"] for run in r["trl"] for s in run])
        ratio = result_ratio(r)
        target = TARGETS.get(args.device)
        parts.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {B} x {G} | {N} | {ours:.3f} | "
                     + (f"{theirs:.3f} | **{ratio:.2f}x** | " if ratio else "- | - | ")
                     + ("-" if args.quick or not ratio else f">= {target:g}x {'met' if ratio >= target else 'MISSED'}")
                     + " |")
    parts.append("")
    for r in results:
        parts.append(model_table(r, args))
    parts.append("Medians over every kept step (the first step of each run discarded). generate: prompt templating + "
                 "sampling + decoding; reward: the two reward functions; log-prob passes: grpo.py's pi_old / pi_ref "
                 "recomputation (none at mu = 1, beta = 0), for TRL the rest of its rollout (padding, advantages); "
                 "update: forward + backward + optimizer step. Completion length: mean tokens per completion "
                 "(EOS included), each side's own samples.")
    return "\n".join(parts) + "\n"


def main(args: Args):
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames TRL still passes
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU; run with --device cpu.")
    if args.trl:
        try:
            import trl
        except ImportError:
            raise SystemExit("TRL is not installed: `pip install trl` (benchmark only), or pass --no-trl.") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (("toy",) if args.quick else ("qwen2.5-0.5b", "100m") if gpu else ("toy", "100m"))
    unknown = [m for m in models if m not in SIZES["cpu"]]
    if unknown:
        raise SystemExit(f"Unknown model(s) {unknown}; choose from {sorted(SIZES['cpu'])}.")
    sizes = SIZES["quick" if args.quick else args.device]
    rounds = args.rounds or (1 if gpu or args.quick else 2)
    dtype_name = "bfloat16" if gpu else "float32"
    dtype = getattr(torch, dtype_name)
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} thread(s)"
    header = (f"### GRPO step: grpo.py vs TRL GRPOTrainer ({where})\n\n`python bench/{Path(__file__).name} "
              f"{' '.join(sys.argv[1:])}`: torch {torch.__version__}, transformers {transformers.__version__}, "
              f"TRL {trl.__version__ if args.trl else '(not run)'}; {rounds} round(s) per side, {args.warmup} warm-up "
              f"step(s) discarded per run; temperature 1, top-p 1, rewards accuracy + 0.1 x format, beta 0, mu 1.")
    print(header, flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="grpo_step_") as root:
        for name in models:
            default = sizes[name]
            size = (args.prompts or default[0], args.num_generations or default[1], args.max_new_tokens or default[2],
                    args.steps or default[3])
            path, what = make_model_dir(name, root, args.seed)
            config = transformers.AutoConfig.from_pretrained(path)
            with torch.device("meta"):
                params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
            result = dict(name=name, what=what, params=params, size=size, dtype=dtype_name, ours=[], trl=[],
                          ours_warm=[], trl_warm=[], errors=[])
            results.append(result)
            for r in range(rounds):
                order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
                for side in order:
                    if side == "trl" and not args.trl:
                        continue
                    if args.threads:
                        torch.set_num_threads(args.threads)
                    out_dir = os.path.join(root, f"{name}-{side}-{r}")
                    print(f"== {name}: {side}, round {r + 1}/{rounds}", flush=True)
                    try:
                        steps, warm = (run_ours(path, size, args, out_dir, dtype_name) if side == "ours"
                                       else run_trl(path, size, args, out_dir, dtype))
                    except Exception as error:  # one side failing must not cost the other its numbers
                        traceback.print_exc()
                        result["errors"].append(f"{side}, round {r + 1}: {type(error).__name__}: {error}"[:300])
                        result[side].append([])  # keeps the rounds of the two sides paired
                        continue
                    result[side].append(steps)
                    result[f"{side}_warm"] += warm
                    print(f"   step s: {[round(s['step'], 3) for s in steps]} (warm-up {[round(w, 1) for w in warm]})",
                          flush=True)
                    gc.collect()
                    if gpu:
                        torch.cuda.empty_cache()
                    table = markdown(results, args, header)
                    if args.out:
                        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                        Path(args.out).write_text(table)
    print("\n" + markdown(results, args, header))
    if args.out:
        print(f"tables written to {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
