"""r1_pipeline.py: the DeepSeek-R1 recipe end to end, stage by stage, each stage's effect measured in the toy world.

The recipe (DeepSeek-R1, arXiv 2501.12948, and its Nature 2025 version), and what each stage is here. Every stage
calls the other scripts' main() (grpo.main, sft.main, rlhf_reward_model.main); no training loop lives in this file.

    stage               the paper                                        here (toy world)
    0 r1_zero           GRPO on the base, accuracy + format rewards,     grpo on toy/base: accuracy + 0.1 format
                        no neural reward model
    1 cold_start        SFT of the base on thousands of long readable    correct R1-Zero samples rewritten readably by a
                        CoTs, "reasoning | summary": few-shot prompting, formatter that plays the annotator (digits only,
                        readable R1-Zero outputs post-processed by       junk and repeated steps dropped, summary added),
                        humans                                           plus a few written by rule; sft of toy/base
    2 reasoning_rl      GRPO: accuracy + format + language consistency   grpo from stage 1: accuracy + 0.1 summary
                        (share of the CoT's words in the target          format + language consistency (share of the
                        language), summed                                reasoning's numbers written in digits)
    3 rejection_sft     sample from stage 2, keep correct and readable   k samples per problem from stage 2; filters:
                        (no mixed languages, long paragraphs, code       correct, one language, no long step, no junk,
                        blocks) ~600k, + ~200k non-reasoning samples;    no repeat, a summary (each filter's removals
                        SFT of the *base* for 2 epochs                   logged); + general prompts answered without
                                                                         reasoning (1 part in 4); sft of toy/base, 2 ep.
    4 all_scenarios     GRPO: rules on reasoning data, reward models on  a Bradley-Terry reward model (rlhf_reward_model)
                        general data (helpfulness on the summary only,   on gold-labelled pairs, reading the answer only;
                        harmlessness on the whole response), preference  a banned-word rule on the whole response; grpo
                        rewards only in the last ~400 steps              on mixed prompts, the reward model only in the
                                                                         last `rm_last_steps` (a second grpo run)
    5 distill           SFT of small students on the 800k samples; RL    sft of toy/student (smaller) on stage 3's data,
                        straight on the small base does worse            beside R1-Zero (grpo) on toy/student (and 5x
                                                                         that with --distill.rl-5x), and on-policy
                                                                         distillation from stage 4's model (grpo
                                                                         --teacher; 2026's TRL and verl have it)

The toy world (toy_world.py's corpus, rlvr_rewards' "toy world" section): arithmetic reasoning where numbers in the
reasoning come in two languages (digits, the target, and letters a-j for 0-9; some base traces switch), traces
are sometimes messy (repeated steps, junk, no summary), and general prompts (greetings, "make 12", "bigger: 7 or
12") whose responses a hidden gold preference ranks. The default base is the verification world's, toy/checks
(docs/aha.md): steps with a two-digit operand slip, and a few traces check them on units digits and write "wait"
and a redo exactly when a check fails, so reflection has a function; toy/student was pretrained on the original
corpus and never checks. `--base toy` runs the original world (toy/base), whose "wait" is staged.

Held-out metrics of every stage's model (names as in metrics.jsonl), on 200 test problems: eval/pass@1_k8_t0.6
(pass@1 over 8 samples at T = 0.6, what R1 reports: the table's main accuracy), eval/accuracy (greedy) and
eval/pass@1_k4_t1.0; on the greedy responses eval/language_consistency (mean share of digits among the reasoning's
numbers), eval/readability (share that are readable R1-format chains of thought), eval/reasoning_share (share with
a think block), eval/response_length (tokens); on the T = 0.6 samples (toy_world.trace_stats, the verification
world's reflection: docs/aha.md) eval/check_share and eval/wait_share (reasoning samples with a units-digit check,
with a "wait"), eval/p_wait_wrong_step, eval/p_correct_wait, eval/reasoning_length (tokens of the reasoning samples
only) and eval/accuracy_hard2 (pass@1 on the problems with two hard steps); on 90 general test prompts,
eval/rm_score (the stage-4 reward model,
normalised) and eval/gold_win_rate (the gold preference against each prompt's reference).

Deviations from the paper, one a line (R1: arXiv 2501.12948 and its Nature 2025 version):
- R1-Zero's 0% readable is built in: its format reward wants nothing between </think> and <answer>, readable a summary.
- Stage 2's 0.1 summary-format reward is not R1's; it alone teaches the readable layout, so the toy needs no cold start.
- Stage 3's non-reasoning data are the base corpus's uncurated answers (harmless ones); R1's ~200k were curated.
- Stage 4 has general prompts on every step, sampled at T = 1; R1: general data only in the last ~400 steps, T = 0.7.
- GRPO runs without a KL penalty (beta = 0, grpo.py's default); R1: beta = 0.001.
- The language reward is weighted 0.5, not summed at 1: at 1 it costs more accuracy than R1's "slight degradation".
- Harmlessness is a banned-word rule on the whole response; R1 used a reward model.
- Stage 4's reward-model phase is a second grpo run from the first's weights (a fresh optimizer, 5 warmup steps).
- The student baseline (R1-Zero on the student) gets comparable wall time, not comparable FLOPs.
- pass@1 samples 8 per problem at T = 0.6 from the whole distribution; R1 also cut at top-p 0.95 (k = 4 to 64).
- R1-Zero's length grows as direct answers vanish (26% -> 100% reason), its traces shorter (35.7 -> 23.9 greedy tokens).

Launch:
    python r1_pipeline.py                                        # every stage, toy world, CPU (8.5 min on 2 idle cores)
    python r1_pipeline.py --stages r1_zero cold_start            # a subset; a rerun skips complete stages
    python r1_pipeline.py --out-dir runs/r1_no_lc --inputs-from runs/r1_pipeline --stages reasoning_rl \\
        --reasoning-rl.language-weight 0                          # ablation: no consistency reward
    python r1_pipeline.py --out-dir runs/r1_no_cs --stages reasoning_rl --no-cold-start    # ablation: no cold start
    python r1_pipeline.py --out-dir runs/r1_no_cs_lc --stages reasoning_rl --no-cold-start \
        --reasoning-rl.language-weight 0                          # ... and no consistency reward
    python r1_pipeline.py --out-dir runs/r1_no_cap --inputs-from runs/r1_pipeline --stages all_scenarios \\
        --all-scenarios.rm-last-steps 60                          # ablation: the reward model on every step
    python r1_pipeline.py --out-dir runs/r1_seeds --seeds 0 1 2  # three pipelines, one after another; mean ± std

Outputs: OUT/<i>_<stage>/ per stage (its runs, data, STAGE_DONE.json with its metrics and its model's held-out
samples), OUT/stages.json and OUT/stages.md (the table). With several --seeds, each seed's pipeline has that
layout in OUT/seed<k>/, and OUT/stages.json and OUT/stages.md give each metric's mean ± sample standard deviation
(n - 1) over the seeds, stages.json with the per-seed values. Every seed is measured on the same held-out problems.

Result (docs/r1_pipeline.md: seeds 0-2 on toy/checks, pass@1 over 8 samples at T = 0.6, mean ± std): R1-Zero
34.2% -> 88.9 ± 1.2%, unreadable, longer only because every response now reasons, and the base's rare checks gone;
the cold start makes 99.5% readable at 6.5 points; reasoning RL 86.0%; rejection-sampling SFT 88.9%; all-scenario
RL keeps 87.4% on reasoning and lifts the general prompts' gold win-rate 28.1% -> 45.3%. On the student, SFT
distillation (82.0%), R1-Zero at matched and 5x compute (82.0%, 83.6%) and on-policy distillation (82.4%) tie on
accuracy; on fresh seeds 3-5 the 5x arm leads SFT distillation by 4.2 points. The distilled students are readable,
the RL ones are not. R1-Zero does not amplify reflection even where
it has a function (docs/aha.md); the cold start makes stage 2 readable from its first step and 80% accurate about
18 steps sooner, and ends where RL from the base ends. On a base that rarely reasons and messily (--base toy/messy),
RL from the base needs about three times the steps to get as readable and accurate (bench/cold_start.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import tyro

import grpo
import rl_kernels as K
import rl_runs as runs
import rlhf_reward_model
import rlvr_rewards as env
import sft
import toy_world as toy

STAGES = ("r1_zero", "cold_start", "reasoning_rl", "rejection_sft", "all_scenarios", "distill")
NEEDS = {"cold_start": ("r1_zero",), "reasoning_rl": ("cold_start",), "rejection_sft": ("reasoning_rl",),
         "all_scenarios": ("rejection_sft",), "distill": ("rejection_sft", "all_scenarios")}
KINDS = ("greeting", "expression", "comparison")
R1_SAMPLES, R1_TEMPERATURE = 8, 0.6  # DeepSeek-R1's pass@1: k samples per problem at T = 0.6 (k = 4 to 64 there)
PASS_AT_1 = f"eval/pass@1_k{R1_SAMPLES}_t{R1_TEMPERATURE}"  # named as env.evaluate names it: eval/pass@1_k8_t0.6
SAMPLE_KEYS = ("general_responses", "reasoning_samples")  # measure()'s samples: in STAGE_DONE.json, not the table
HELD_OUT_SEED = 0  # draws the held-out problems and prompts for every --seeds entry (held_out)


@dataclass
class R1Zero:
    steps: int = 80  # GRPO steps, 16 prompts x 8 samples each
    lr: float = 2e-4  # learning rate


@dataclass
class ColdStart:
    prompts: int = 400  # training problems sampled 4 times each from the R1-Zero model
    size: int = 300  # readable chains of thought kept from those samples, one per problem
    rule_written: int = 60  # more written by rule (R1's few-shot prompting), every third checking its hard steps
    epochs: float = 3  # SFT epochs
    lr: float = 1e-3  # SFT learning rate


@dataclass
class ReasoningRL:
    steps: int = 60  # GRPO steps
    lr: float = 2e-4  # learning rate
    language_weight: float = 0.5  # weight of the language-consistency reward (0: the ablation; still logged)


@dataclass
class RejectionSFT:
    prompts: int = 1500  # training problems, each sampled `samples` times from the stage-2 model at T=1
    samples: int = 4  # samples per problem
    general_share: float = 0.25  # share of the SFT data that is general prompts answered without reasoning
    epochs: float = 2  # SFT epochs (of the base model, as R1)
    lr: float = 1e-3  # SFT learning rate


@dataclass
class AllScenarios:
    rm_steps: int = 300  # reward-model training steps, 16 pairs each
    rm_pairs: int = 3000  # gold-labelled preference pairs on general training prompts
    steps: int = 60  # GRPO steps in all
    rm_last_steps: int = 15  # the cap: the reward model rewards only the last this many steps (>= steps: all)
    general_share: float = 0.25  # share of the RL prompts that are general prompts
    lr: float = 2e-4  # learning rate


@dataclass
class Distill:
    student: str = os.path.join(os.path.dirname(toy.TOY_BASE), "student")  # the smaller pretrained student
    epochs: float = 3  # SFT epochs on stage 3's data
    lr: float = 2e-3  # SFT learning rate
    rl_steps: int = 40  # GRPO steps of the baseline, R1-Zero on the student: about the distillation's trained tokens
    rl_5x: bool = False  # also R1-Zero on the student for 5 x rl_steps (row student_rl_5x)
    on_policy: bool = True  # also on-policy distillation (row student_opd): rl_steps of grpo --teacher, stage 4's model


@dataclass
class Sampling:
    """How every GRPO stage samples and corrects the sampler-trainer mismatch (grpo.py's flags of the same names)."""
    top_p: float = 1.0
    top_k: int = 0
    keep_sampling_mask: bool = True
    rollout_correction: str = "none"
    """a preset of rl_kernels.CORRECTIONS (trl, openrlhf, icepop, verl-token-tis, verl-geo-rs, bypass, ...)"""
    offpolicy_mask_delta: Optional[float] = None
    sampler_logit_noise: float = 0.0


@dataclass
class Args:
    out_dir: str = "runs/r1_pipeline"
    """a subdirectory per stage; stages.json and stages.md (several --seeds: OUT/seed<k>/ each, the means here)"""
    base: str = toy.TOY_CHECKS
    """the base model (default toy/checks, the verification world's; 'toy': toy/base, the original world's)"""
    stages: tuple[str, ...] = STAGES
    """the stages to run; the others they need must be complete here or in --inputs-from"""
    inputs_from: Optional[str] = None
    """an earlier out dir whose complete stages stand in for those not run here (ablations); its seed<k>/ if any"""
    no_cold_start: bool = False
    """ablation: reasoning RL starts from the base model instead of the cold-start model"""
    seeds: tuple[int, ...] = (0,)
    """one pipeline per seed (it seeds every run and sample); several: each in OUT/seed<k>/, OUT/stages.md the means"""
    max_new_tokens: int = 72
    """response length cap in every stage and evaluation"""
    eval_size: int = 200
    """held-out arithmetic problems"""
    general_eval_size: int = 90
    """held-out general prompts, a third of each kind"""
    r1_zero: R1Zero = field(default_factory=R1Zero)
    cold_start: ColdStart = field(default_factory=ColdStart)
    reasoning_rl: ReasoningRL = field(default_factory=ReasoningRL)
    rejection_sft: RejectionSFT = field(default_factory=RejectionSFT)
    all_scenarios: AllScenarios = field(default_factory=AllScenarios)
    distill: Distill = field(default_factory=Distill)
    sampling: Sampling = field(default_factory=Sampling)
    # Set by main for each pipeline it runs, from --seeds: not a flag.
    seed: tyro.conf.Suppress[int] = 0


class Stopped(RuntimeError):
    """A run inside a stage stopped on a signal after saving a checkpoint; rerunning continues it."""

    def __init__(self, message: str, signal: int | None = None):
        super().__init__(message)
        self.signal = signal


# ----------------------------------------------------------------------------------------------------------
# The toy recipe's pieces: the annotator, the rejection filters, data, measurements
# ----------------------------------------------------------------------------------------------------------

def annotate(prompt: str, completion: str) -> str | None:
    """R1's human annotator as a rule: a correct sample rewritten readably (numbers in digits, junk and repeated
    steps dropped, "wait" kept, the summary added); None when a step cannot be read (a long step)."""
    steps = []
    for item in completion.partition("<think>")[2].partition("</think>")[0].split(","):
        cleaned = item if item == "wait" else re.sub(r"[^0-9a-j+\-*=]", "", item)
        step = env.parse_step(cleaned)
        if cleaned not in ("", "wait") and step is None:
            return None
        text = "{}{}{}={}".format(*step) if step else cleaned
        if text and (text == "wait" or text not in steps or (  # a units-digit check may repeat an earlier one's text
                steps and env.is_check_of(env.parse_step(steps[-1]), step))):
            steps.append(text)
    answer = env.extract_answer(completion)
    trace = f"<think>{','.join(steps)}</think>{prompt}={answer}<answer>{answer}</answer>"
    return trace if env.is_readable(trace) else None


def rejection_filter(completion: str, answer: str) -> str | None:
    """The first of stage 3's filters a sample fails ('wrong', 'mixed language', 'long step', 'junk', 'repeat',
    'no summary'; a response that is not a chain of thought in R1's layout counts as junk), or None: kept."""
    if env.accuracy_reward([completion], answer=[answer])[0] != 1.0:
        return "wrong"
    if (env.language_consistency_reward([completion], language="digits")[0] or 0.0) < 1.0:
        return "mixed language"
    problems = ["junk" if p == "layout" else p for p in env.readability_problems(completion)]
    return next((p for p in ("long step", "junk", "repeat", "no summary") if p in problems), None)


def reasoning_rows(split: str, n: int, seed: int) -> list[dict]:
    return [{"prompt": r["prompt"], "answer": r["answer"], "language": "digits", "reference": None}
            for r in env.make_dataset("arithmetic", split, n, seed)]


def general_rows(split: str, n: int, seed: int) -> list[dict]:
    """n general prompts, a third of each kind, distinct while a kind has enough (no target language: the
    consistency reward does not apply)."""
    rng, counts = random.Random(f"general/{split}/{seed}"), [n // 3 + (i < n % 3) for i in range(3)]
    pools = [env.general_prompts(k, split) for k in KINDS]
    prompts = [p for pool, k in zip(pools, counts) for p in (rng.sample(pool, k) if k <= len(pool) else
                                                               rng.choices(pool, k=k))]
    return [{**env.general_row(p), "language": None} for p in prompts]


def held_out(args: Args) -> tuple[list[dict], list[dict]]:
    """The held-out arithmetic problems and general prompts, the same for every seed (seed 0's draw): each seed's
    pipeline is measured on one fixed test set, as the paper's benchmarks are fixed."""
    return (reasoning_rows("test", args.eval_size, HELD_OUT_SEED),
            general_rows("test", args.general_eval_size, HELD_OUT_SEED))


def sft_row(prompt: str, completion: str, answer=None) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "completion": completion, "answer": answer}


def write_jsonl(path: str, rows: list[dict]) -> str:
    return runs.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


@torch.no_grad()
def sample(model_path: str, rows: list[dict], k: int, args: Args, temperature: float = 1.0):
    """(model, tokenizer, k completions per row): sampled from a seeded generator, or greedy at temperature 0."""
    model, tokenizer = K.load_model(model_path)
    K.set_cpu_threads(0, model)
    generator = torch.Generator(next(model.parameters()).device).manual_seed(args.seed)
    return model, tokenizer, env.sample(model, tokenizer, rows, num_samples=k, max_new_tokens=args.max_new_tokens,
                                        temperature=temperature, generator=generator).completions


@torch.no_grad()
def sampled_pass_at_1(model, tokenizer, rows: list[dict], args: Args, batch_size: int = 64) -> tuple[float, list[str]]:
    """pass@1 as DeepSeek-R1 reports it (arXiv 2501.12948, section 3's evaluation setup): the mean correctness of
    R1_SAMPLES samples per problem at R1_TEMPERATURE (R1 also cuts at top-p 0.95; here the full distribution). Returns
    it and the samples (row-major: sample j of row i at i * R1_SAMPLES + j), for measures of the rollouts. The noise
    is keyed by (seed, row index, sample index) and the rows batched as env.evaluate does, so the value is exactly
    the eval/pass@1_k8_t0.6 env.evaluate would report (tested)."""
    texts = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        texts += env.sample(model, tokenizer, batch, num_samples=R1_SAMPLES, max_new_tokens=args.max_new_tokens,
                            temperature=R1_TEMPERATURE, noise_keys=K.eval_noise_keys(
                                args.seed, range(start, start + len(batch)), R1_SAMPLES)).completions
    correct = env.accuracy_reward(texts, answer=[r["answer"] for r in rows for _ in range(R1_SAMPLES)])
    return sum(v == 1.0 for v in correct) / len(correct), texts


def measure(args: Args, model_path: str) -> dict:
    """The held-out metrics of a model for the stage table: reasoning prompts greedy, pass@1 over 8 samples at
    T = 0.6 (R1's) and over 4 at T = 1; general prompts 4 samples each at T = 1 (eval/rm_score is added when the
    table is made). The samples themselves ride along under SAMPLE_KEYS, kept in STAGE_DONE.json, not in the table."""
    rows, general = held_out(args)
    model, tokenizer, texts = sample(model_path, general, 4, args)
    greedy = env.sample(model, tokenizer, rows, num_samples=1, max_new_tokens=args.max_new_tokens,
                        temperature=0.0).completions
    metrics = env.evaluate(model, tokenizer, rows, max_new_tokens=args.max_new_tokens, samples=4, seed=args.seed)
    metrics[PASS_AT_1], reasoning_samples = sampled_pass_at_1(model, tokenizer, rows, args)
    languages = [v for v in env.language_consistency_reward(greedy, language="digits") if v is not None]
    wins = env.gold_win_reward(texts, prompt=[r["prompt"] for r in general for _ in range(4)],
                               reference=[r["reference"] for r in general for _ in range(4)])
    reflection = toy.trace_stats(reasoning_samples, [r["answer"] for r in rows for _ in range(R1_SAMPLES)],
                                 [r["prompt"] for r in rows for _ in range(R1_SAMPLES)])  # the verification world's
    metrics.update({f"eval/{k}": reflection[k] for k in ("check_share", "wait_share", "p_wait_wrong_step",
                                                        "p_correct_wait", "accuracy_hard2", "reasoning_length")})
    return {**metrics, "eval/language_consistency": sum(languages) / max(1, len(languages)),
            "eval/readability": sum(map(env.is_readable, greedy)) / len(greedy),
            "eval/gold_win_rate": sum(wins) / len(wins), "eval/harmful_share": sum(map(env.harmful, texts)) / len(texts),
            "general_responses": texts, "reasoning_samples": reasoning_samples}


# ----------------------------------------------------------------------------------------------------------
# Running the scripts' main(), and stage bookkeeping
# ----------------------------------------------------------------------------------------------------------

def run(main, script_args) -> str:
    """A script's main on its own out dir: a finished run (final/) is not repeated, a stopped one resumes from its
    checkpoint, one that died before its first checkpoint starts afresh. Returns final/."""
    final = os.path.join(script_args.out_dir, "final")
    if os.path.isdir(final):
        return final
    resume = runs.latest_checkpoint(script_args.out_dir) is not None
    result = main(dataclasses.replace(script_args, resume=resume, overwrite=not resume))
    if result.stopped_at is not None:
        raise Stopped(f"{script_args.out_dir} stopped at step {result.stopped_at}", result.signal)
    return result.final_dir


def grpo_run(args: Args, out_dir: str, model: str, steps: int, lr: float, dataset: str, rewards: dict,
             **extra) -> str:
    return run(grpo.main, grpo.Args(**extra,
        model=model, dataset=dataset, eval_dataset=data_file(args, "reasoning_test"), rewards=tuple(rewards),
        reward_weights=tuple(rewards.values()), out_dir=out_dir, seed=args.seed, max_steps=steps, lr=lr,
        max_new_tokens=args.max_new_tokens, eval_every=20, eval_samples=0, eval_size=args.eval_size, save_every=10,
        plot=False, **dataclasses.asdict(args.sampling)))


def sft_run(args: Args, out_dir: str, model: str, dataset: str, epochs: float, lr: float) -> str:
    return run(sft.main, sft.Args(model=model, dataset=dataset, out_dir=out_dir, export_dir="", seed=args.seed,
                                  epochs=epochs, lr=lr, batch_size=32, grad_accum=1, warmup_steps=5, eval_every=0,
                                  eval_size=32, save_every=25, max_new_tokens=args.max_new_tokens))


def data_file(args: Args, name: str) -> str:
    """The shared arithmetic prompts (train and held-out test) with their target language, written once."""
    path = os.path.join(args.out_dir, "data", f"{name}.jsonl")
    if not os.path.exists(path):
        write_jsonl(path, held_out(args)[0] if name == "reasoning_test" else reasoning_rows("train", 8000, args.seed))
    return path


def stage_dir(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f"{STAGES.index(name)}_{name}")


def load_done(args: Args, name: str) -> dict | None:
    """A complete stage's record: from this out dir, or for a stage not run here, from --inputs-from."""
    for root in (args.out_dir,) + ((args.inputs_from,) if args.inputs_from and name not in args.stages else ()):
        path = os.path.join(stage_dir(root, name), "STAGE_DONE.json")
        if os.path.exists(path):
            with open(path) as f:
                return {**json.load(f), "from": None if root == args.out_dir else root}
    return None


# ----------------------------------------------------------------------------------------------------------
# The stages: each returns {"model": its final model, ...}; run_stage measures it and marks it complete
# ----------------------------------------------------------------------------------------------------------

def r1_zero(args: Args, path: str, done: dict, model: str | None = None, steps: int | None = None) -> dict:
    """Stage 0 (and stage 5's baseline): GRPO on a base model, accuracy + format, no reward model. Language
    consistency is logged with weight 0, to watch the languages mix."""
    rewards = {"accuracy": 1.0, "format": 0.1, "language_consistency": 0.0}
    return {"model": grpo_run(args, os.path.join(path, "grpo"), model or args.base, steps or args.r1_zero.steps,
                              args.r1_zero.lr, data_file(args, "reasoning_train"), rewards)}


def cold_start(args: Args, path: str, done: dict) -> dict:
    """Stage 1: SFT of the base on readable chains of thought, mostly correct R1-Zero samples rewritten by the
    annotator, a few written by rule."""
    c, data = args.cold_start, os.path.join(path, "data.jsonl")
    if not os.path.exists(data):
        rows = env.make_dataset("arithmetic", "train", c.prompts, args.seed + 1)
        chosen = {}
        for i, text in enumerate(sample(done["r1_zero"]["model"], rows, 4, args)[2]):
            row = rows[i // 4]
            readable = env.accuracy_reward([text], answer=[row["answer"]])[0] and annotate(row["prompt"], text)
            if readable and row["prompt"] not in chosen and len(chosen) < c.size:
                chosen[row["prompt"]] = sft_row(row["prompt"], readable, row["answer"])
        written = [sft_row(r["prompt"], toy.readable_trace(r["prompt"], checks=i % 3 == 0), r["answer"])
                   for i, r in enumerate(env.make_dataset("arithmetic", "train", c.rule_written, args.seed + 2))]
        write_jsonl(data, list(chosen.values()) + written)
        print(f"cold start: {len(chosen)} annotated R1-Zero samples + {len(written)} written by rule")
    return {"model": sft_run(args, os.path.join(path, "sft"), args.base, data, c.epochs, c.lr)}


def reasoning_rl(args: Args, path: str, done: dict) -> dict:
    """Stage 2: GRPO with accuracy + R1's format with a summary + language consistency, summed."""
    start = args.base if args.no_cold_start else done["cold_start"]["model"]
    rewards = {"accuracy": 1.0, "summary_format": 0.1, "language_consistency": args.reasoning_rl.language_weight}
    return {"model": grpo_run(args, os.path.join(path, "grpo"), start, args.reasoning_rl.steps, args.reasoning_rl.lr,
                              data_file(args, "reasoning_train"), rewards)}


def rejection_sft(args: Args, path: str, done: dict) -> dict:
    """Stage 3: samples of stage 2 that pass the filters, plus general prompts answered without reasoning (the base
    corpus's responses, harmless); SFT of the base model."""
    c, data, stats_file = args.rejection_sft, os.path.join(path, "data.jsonl"), os.path.join(path, "filters.json")
    if not os.path.exists(data):
        rows = env.make_dataset("arithmetic", "train", c.prompts, args.seed + 3)
        stats, kept = {"samples": c.prompts * c.samples, "removed_by": {}}, {}
        for i, text in enumerate(sample(done["reasoning_rl"]["model"], rows, c.samples, args)[2]):
            row, reason = rows[i // c.samples], rejection_filter(text, rows[i // c.samples]["answer"])
            stats["removed_by"][reason] = stats["removed_by"].get(reason, 0) + 1
            kept.setdefault((row["prompt"], text), sft_row(row["prompt"], text, row["answer"])) if not reason else None
        stats["kept"], stats["distinct_kept"] = stats["removed_by"].pop(None, 0), len(kept)
        rng, n = random.Random(args.seed), max(1, round(len(kept) * c.general_share / (1 - c.general_share)))
        general = [sft_row(r["prompt"], toy.toy_general_completion(r["prompt"], rng, reasoning=False, harmful=False))
                   for r in general_rows("train", n, args.seed)]
        runs.write_text(stats_file, json.dumps({**stats, "general": len(general)}, indent=1))
        write_jsonl(data, list(kept.values()) + general)  # last: its presence marks the data complete
    with open(stats_file) as f:
        filters = json.load(f)
    print(f"rejection sampling: {json.dumps(filters)}")
    return {"model": sft_run(args, os.path.join(path, "sft"), args.base, data, c.epochs, c.lr), "filters": filters,
            "data": data}


def preference_pairs(path: str, split: str, n: int, seed: int) -> str:
    """n pairs of base-corpus responses to general prompts, labelled by the gold preference on the answer alone
    (helpfulness: harm in the reasoning is the harmlessness rule's business), ties dropped."""
    rng, lines = random.Random(f"{split}/{seed}"), []
    while len(lines) < n:
        prompt = rng.choice(env.general_prompts(rng.choice(KINDS), split))
        a, b = (env.final_text(toy.toy_general_completion(prompt, rng)) for _ in range(2))
        order = env.gold_preference(prompt, a, b)
        if order:
            lines.append({"prompt": prompt, "chosen": a if order > 0 else b, "rejected": b if order > 0 else a})
    return write_jsonl(os.path.join(path, f"preferences_{split}.jsonl"), lines)


def all_scenarios(args: Args, path: str, done: dict) -> dict:
    """Stage 4: a reward model for general prompts; GRPO on mixed prompts with rules for reasoning, the harmlessness
    rule on whole responses, and the reward model (answer only) in the last rm_last_steps only."""
    c = args.all_scenarios
    reward_model = run(rlhf_reward_model.main, rlhf_reward_model.Args(
        model=args.base, dataset=preference_pairs(path, "train", c.rm_pairs, args.seed), eval_dataset=preference_pairs(
            path, "test", c.rm_pairs // 10, args.seed), out_dir=os.path.join(path, "reward_model"), seed=args.seed,
        max_steps=c.rm_steps, eval_every=0, save_every=100))
    os.environ["RLHF_REWARD_MODEL"] = reward_model  # what rlhf_reward_model.helpfulness_reward loads
    prompts = os.path.join(path, "prompts.jsonl")
    write_jsonl(prompts, reasoning_rows("train", 6000, args.seed) + general_rows(
        "train", round(6000 * c.general_share / (1 - c.general_share)), args.seed))
    rules = {"accuracy": 1.0, "summary_format": 0.1, "language_consistency": args.reasoning_rl.language_weight,
             "harmlessness": 1.0, "gold_win": 0.0}  # gold_win: the hidden preference, logged and never rewarded
    model, rule_steps = done["rejection_sft"]["model"], max(0, c.steps - c.rm_last_steps)
    if rule_steps:
        model = grpo_run(args, os.path.join(path, "grpo_rules"), model, rule_steps, c.lr, prompts, rules)
    if c.steps > rule_steps:
        model = grpo_run(args, os.path.join(path, "grpo_reward_model"), model, c.steps - rule_steps, c.lr, prompts,
                         {**rules, "rlhf_reward_model:helpfulness_reward": 1.0})
    return {"model": model, "reward_model": reward_model}


def distill(args: Args, path: str, done: dict) -> dict:
    """Stage 5: SFT of the smaller student on stage 3's data; beside it, each measured as a row of its own, the
    paper's baseline, R1-Zero straight on the student (rl_steps, and 5x that with rl_5x), and on-policy distillation:
    the student samples, stage 4's model (the teacher, R1) scores every token of it, the reward the per-token
    reverse KL (grpo.py --teacher), no task reward, for rl_steps."""
    c = args.distill
    model = sft_run(args, os.path.join(path, "sft"), c.student, done["rejection_sft"]["data"], c.epochs, c.lr)
    arms = {"student_rl": lambda out: r1_zero(args, out, done, c.student, c.rl_steps)["model"]}
    if c.rl_5x:
        arms["student_rl_5x"] = lambda out: r1_zero(args, out, done, c.student, 5 * c.rl_steps)["model"]
    if c.on_policy:
        arms["student_opd"] = lambda out: grpo_run(
            args, out, c.student, c.rl_steps, args.r1_zero.lr, data_file(args, "reasoning_train"),
            {"accuracy": 0.0, "format": 0.0}, teacher=done["all_scenarios"]["model"])
    record = {"model": model}
    for name, train in arms.items():
        t0 = time.time()
        record[name] = {"metrics": measure(args, train(os.path.join(path, name))), "wall_s": time.time() - t0}
    return record


def run_stage(args: Args, name: str, done: dict) -> dict:
    """Run a stage, measure its model, and mark it complete: STAGE_DONE.json holds its record."""
    path, t0 = stage_dir(args.out_dir, name), time.time()
    print(f"\n==== stage {STAGES.index(name)}: {name} -> {path}", flush=True)
    record = globals()[name](args, path, done)
    record.update(stage=name, metrics=measure(args, record["model"]),
                  wall_s=time.time() - t0 - sum(record.get(arm, {}).get("wall_s", 0.0) for arm in STUDENT_ARMS))
    write_jsonl(os.path.join(path, "STAGE_DONE.json"), [record])
    return record


# ----------------------------------------------------------------------------------------------------------
# The stage table, with the direction the R1 paper reports beside each value
# ----------------------------------------------------------------------------------------------------------

COLUMNS = {PASS_AT_1: "pass@1 T=0.6", "eval/accuracy": "greedy", "eval/pass@1_k4_t1.0": "pass@1 T=1",
           "eval/accuracy_hard2": "2 hard steps", "eval/check_share": "checks", "eval/wait_share": "waits",
           "eval/language_consistency": "language", "eval/readability": "readable", "eval/response_length": "length",
           "eval/rm_score": "RM score", "eval/gold_win_rate": "gold win", "wall_s": "wall s"}
# Each stage against the row before it (R1-Zero against the base, the cold start against R1-Zero, the student
# rows against the teacher): DeepSeek-R1, arXiv 2501.12948 and its Nature 2025 table; REFERENCE.md sections 7, 11.
# The paper's accuracies are pass@1 at T = 0.6, so its directions sit on that column.
PAPER = {"r1_zero": {PASS_AT_1: "↑", "eval/response_length": "↑", "eval/readability": "poor",
                     "eval/language_consistency": "mixes"},
         "cold_start": {PASS_AT_1: "↓", "eval/readability": "↑"},
         "reasoning_rl": {PASS_AT_1: "↑", "eval/language_consistency": "↑, costs a little accuracy"},
         "rejection_sft": {PASS_AT_1: "↑", "eval/readability": "kept"},
         "all_scenarios": {PASS_AT_1: "kept", "eval/rm_score": "↑", "eval/gold_win_rate": "↑"},
         "distill": {PASS_AT_1: "most of the teacher's"}, "student_rl": {PASS_AT_1: "< distilled"},
         "student_rl_5x": {PASS_AT_1: "< distilled"}}
STUDENT_ARMS = ("student_rl", "student_rl_5x", "student_opd")  # stage 5's rows beside the distilled student


def stage_table(args: Args, done: dict) -> list[dict]:
    """stages.json (one object per stage, and the base models) and stages.md; printed."""
    rows = [("base", args.base)] + [(name, done[name]) for name in STAGES if name in done]
    rows += [("student_base", args.distill.student)] + [
        (arm, {**done["distill"][arm], "from": done["distill"].get("from")}) for arm in STUDENT_ARMS
        if arm in done["distill"]] if "distill" in done else []
    cache_file = os.path.join(args.out_dir, "base_models.json")
    cache = json.load(open(cache_file)) if os.path.exists(cache_file) else {}  # base models measured once
    reward_model = done.get("all_scenarios", {}).get("reward_model")
    scorer = rlhf_reward_model.RewardModelScorer(reward_model, normalize=True) if reward_model else None
    prompts = [r["prompt"] for r in held_out(args)[1] for _ in range(4)]
    table = []
    for name, record in rows:
        if isinstance(record, str):  # a base model: measured once (again if measured before the reflection measures)
            if "eval/check_share" not in cache.get(name, {}).get("metrics", {}):
                cache[name] = {"metrics": measure(args, record)}
            record = cache[name]
        metrics = {k: v for k, v in record["metrics"].items() if k not in SAMPLE_KEYS}
        if scorer is not None:
            scores = scorer([env.final_text(t) for t in record["metrics"]["general_responses"]], prompt=prompts)
            metrics["eval/rm_score"] = sum(scores) / len(scores)
        table.append({"stage": name, **metrics, "wall_s": record.get("wall_s"), "paper": PAPER.get(name, {}),
                      "from": record.get("from") if isinstance(record, dict) else None})
    for path, content in ((cache_file, cache), (os.path.join(args.out_dir, "stages.json"), table)):
        runs.write_text(path, json.dumps(content, indent=1))

    write_markdown(args, table, lambda row, key: number(key, row.get(key)))
    return table


def number(key: str, value) -> str:
    """A metric's value as the table writes it: wall seconds whole, lengths to 0.1 token, the rest to 0.001."""
    fmt = {"wall_s": "{:.0f}", "eval/response_length": "{:.1f}"}.get(key, "{:.3f}")
    return "–" if value is None else fmt.format(value)


def write_markdown(args: Args, table: list[dict], cell, note: str = "") -> None:
    """OUT/stages.md, printed: a row per stage, a column per COLUMNS entry written by cell(row, key), the paper's
    direction beside it."""
    def with_paper(row, key):
        return cell(row, key) + (f" ({row['paper'][key]})" if key in row["paper"] else "")

    lines = ["| stage | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {row['stage']}{' *' if row['from'] else ''} | " + " | ".join(with_paper(row, key) for key in COLUMNS)
              + " |" for row in table]
    text = "\n".join(lines) + (
        "\n\nIn parentheses: the direction DeepSeek-R1 reports for the stage against the row before it (R1-Zero "
        "against the base, the cold start against R1-Zero, the student rows against the teacher).\n" + note)
    if any(row["from"] for row in table):
        text += f"* run in {args.inputs_from} (--inputs-from), not in this out dir.\n"
    runs.write_text(os.path.join(args.out_dir, "stages.md"), text)
    print("\n" + text + f"\nWritten: {args.out_dir}/stages.json, {args.out_dir}/stages.md")


def mean_and_spread(values: list) -> dict:
    """{"mean", "std", "values"}: the mean and the sample standard deviation (n - 1 in the denominator) of the
    values present (None or nan: missing, e.g. P(correct | wait) of a seed whose samples never wait), each None
    without enough of them (one for the mean, two for the spread)."""
    present = [v for v in values if v is not None and v == v]
    return {"mean": statistics.mean(present) if present else None,
            "std": statistics.stdev(present) if len(present) > 1 else None, "values": values}


def seeds_table(tables: dict[int, list[dict]]) -> list[dict]:
    """The rows of several seeds' stage tables ({seed: its stages.json}) as one row per stage, each metric as
    mean_and_spread over the seeds, its values in the order of the row's "seeds"."""
    seeds = list(tables)
    by_seed = {seed: {row["stage"]: row for row in table} for seed, table in tables.items()}
    summary = []
    for name in dict.fromkeys(row["stage"] for table in tables.values() for row in table):
        rows = [by_seed[seed].get(name, {}) for seed in seeds]
        keys = dict.fromkeys(key for row in rows for key in row if key not in ("stage", "paper", "from"))
        summary.append({"stage": name, "seeds": seeds, **{key: mean_and_spread([row.get(key) for row in rows])
                                                          for key in keys},
                        "paper": PAPER.get(name, {}), "from": next((row["from"] for row in rows if row.get("from")),
                                                                   None)})
    return summary


def write_seeds_table(args: Args, tables: dict[int, list[dict]]) -> list[dict]:
    """OUT/stages.json (seeds_table) and OUT/stages.md: each metric's mean ± sample standard deviation over seeds."""
    summary = seeds_table(tables)
    runs.write_text(os.path.join(args.out_dir, "stages.json"), json.dumps(summary, indent=1))

    def cell(row, key):
        value = row.get(key) or {"mean": None, "std": None}
        return number(key, value["mean"]) + ("" if value["std"] is None else f" ± {number(key, value['std'])}")

    write_markdown(args, summary, cell, f"Each cell: the mean ± the sample standard deviation (n - 1) over seeds "
                   f"{', '.join(map(str, tables))}, measured on the same held-out problems; the per-seed values are "
                   f"in stages.json, each seed's table in seed<k>/stages.md.\n")
    return summary


def check_lengths(args: Args):
    """--max-new-tokens plus the longest prompt of the stages' data (arithmetic, general prompts) must fit the
    context of the base and, for distillation, the student: one sentence before any stage runs (each stage's script
    checks its own data again, but the table's measure() and the data-making samples generate here). The sampling
    settings are checked here too."""
    env.check_sampling(grpo.Args(**dataclasses.asdict(args.sampling)))
    rows = (reasoning_rows("train", 200, args.seed) + held_out(args)[0]
            + general_rows("test", max(3, args.general_eval_size), HELD_OUT_SEED))
    for model in [args.base] + ([args.distill.student] if "distill" in args.stages else []):
        config = env.model_config(model)
        env.check_context(K.load_tokenizer(K.resolve_model_path(model)), rows, max_new_tokens=args.max_new_tokens,
                          context=getattr(config.get_text_config(decoder=True), "max_position_embeddings", None),
                          source="the pipeline", measured=len(rows))


def seed_args(args: Args, seed: int) -> Args:
    """The args of one seed's pipeline: one seed runs in OUT, several each in OUT/seed<k>/; --inputs-from's
    seed<k>/ stands in where it exists, else --inputs-from itself."""
    out_dir = args.out_dir if len(args.seeds) == 1 else os.path.join(args.out_dir, f"seed{seed}")
    inputs_from = args.inputs_from
    if inputs_from and os.path.isdir(os.path.join(inputs_from, f"seed{seed}")):
        inputs_from = os.path.join(inputs_from, f"seed{seed}")
    return dataclasses.replace(args, seed=seed, out_dir=out_dir, inputs_from=inputs_from)


def completed_stages(args: Args) -> dict:
    """One seed's complete stages, after checking that every stage to run has the stages it needs (one sentence
    otherwise, before any stage of any seed runs)."""
    done = {name: record for name in STAGES if (record := load_done(args, name))}
    for name in args.stages:
        needs = () if name == "reasoning_rl" and args.no_cold_start else NEEDS.get(name, ())
        missing = [n for n in needs if n not in done and n not in args.stages]
        if missing and name not in done:
            raise K.UserError(f"stage {name} needs stage {missing[0]}: add it to --stages, or pass --inputs-from an "
                             f"out dir where it is complete.")
    return done


def main(args: Args) -> list[dict]:
    """For each seed, run the requested stages in order, skipping complete ones, then write and print its stage
    table; with several seeds, then the table of their means. Returns the (last written) table's rows."""
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        raise K.UserError(f"--stages: unknown stage {unknown[0]!r}; the stages are {' '.join(STAGES)}.")
    if args.max_new_tokens < 1:
        raise K.UserError(f"--max-new-tokens {args.max_new_tokens}: must be positive.")
    if not args.seeds or len(set(args.seeds)) < len(args.seeds):
        raise K.UserError(f"--seeds {' '.join(map(str, args.seeds))}: give one or more distinct seeds.")
    check_lengths(args)
    pipelines = [seed_args(args, seed) for seed in args.seeds]
    dones = [completed_stages(pipeline) for pipeline in pipelines]
    tables = {}
    for pipeline, done in zip(pipelines, dones):
        if len(pipelines) > 1:
            print(f"\n======== seed {pipeline.seed} -> {pipeline.out_dir}", flush=True)
        for name in STAGES:
            if name in pipeline.stages and name not in done:
                done[name] = run_stage(pipeline, name, done)
        tables[pipeline.seed] = stage_table(pipeline, done)
    return tables[args.seeds[0]] if len(tables) == 1 else write_seeds_table(args, tables)


def cli(args: Args) -> None:
    """A stop inside a stage exits 128 + its signal (after the stage's run saved), and says how to continue."""
    try:
        main(args)
    except Stopped as stop:
        print(f"Stopped ({stop}); run the same command again to continue where it stopped.", flush=True)
        raise SystemExit(128 + (stop.signal or 15))


if __name__ == "__main__":
    runs.run_cli(cli, tyro.cli(Args))
