"""bench/aha.py: does R1-Zero amplify reflection when reflection has a function? The verification world and its
controls (toy_world.TOY_WORLDS), each a base model under toy/, trained with R1-Zero (r1_pipeline.py's stage 0:
GRPO on the base, accuracy + 0.1 format, 16 prompts x 8 samples, 80 steps, lr 2e-4, 72 new tokens at most) and
measured on rollouts, not greedy answers.

    base            the world                                          what "wait" means there
    checks          a units-digit check and its verdict after hard     the check failed; the step redone is right
                    steps (rare), "wait" exactly when it fails
    no_checks       (a) the same slips, no checks                      never written
    random_wait     (b) checks, "wait" at random                       nothing: form without function
    wrong_redo      (c) checks, "wait" when they fail                  the check failed; the redo is wrong half the time
    checks_long     the main world's base pretrained 1300 steps longer as in checks; the control for the two readings
                                                                       of the main result (docs/aha.md)

Each run is `python grpo.py` in a fresh process with one torch thread, every rollout logged (--log-samples 128),
so toy_world.trace_stats reads the checks, waits and redos of all 10,240 training samples of a run step by step.
The base and the final model are measured on 200 held-out problems: greedy accuracy, and 8 samples each at T = 1
and at T = 0.6 (DeepSeek-R1's pass@1 temperature) through trace_stats.

    python bench/aha.py --seeds 0 1 2                  # docs/aha.md: 15 runs, 2 at a time, 1.5-5 min each
    python bench/aha.py --worlds checks --seeds 0      # a subset
    python bench/aha.py --seeds 0 1 2 --worlds checks checks_long no_checks --max-new-tokens 128 \
        --root runs/aha_cap128 --out docs/aha_cap128.md --plot docs/aha_cap128.png   # the cap control (docs/aha.md)

A run whose out dir holds measured.json is read, not rerun (--rerun redoes it), so a cut-off sweep resumes.
Writes docs/aha_results.md (the tables) and docs/aha.png (rollout curves: mean over seeds, the band min to max).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORLDS = {"checks": "toy/checks", "no_checks": "toy/no_checks", "random_wait": "toy/random_wait",
          "wrong_redo": "toy/wrong_redo", "checks_long": "toy/checks_long"}
LABELS = {"checks": "checks (main)", "no_checks": "(a) no checks", "random_wait": "(b) random wait",
          "wrong_redo": "(c) wrong redo", "checks_long": "checks, redo trained longer"}
# The per-step rollout measures drawn and tabled: (trace_stats key, label)
CURVES = [("accuracy", "rollout accuracy"), ("check_share", "reasoning samples with a check"),
          ("wait_share", "reasoning samples with a wait"), ("reasoning_length", "reasoning length (tokens)")]


@dataclass
class Args:
    worlds: tuple[str, ...] = tuple(WORLDS)
    """which bases: checks | no_checks | random_wait | wrong_redo"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds (each world once per seed)"""
    steps: int = 80
    """GRPO steps (r1_pipeline's R1-Zero)"""
    jobs: int = 2
    """runs at a time (each one torch thread)"""
    root: str = "runs/aha"
    """where the runs write"""
    rerun: bool = False
    """rerun runs that already finished"""
    eval_size: int = 200
    """held-out problems"""
    max_new_tokens: int = 72
    """the token cap of the runs and of their measures (r1_pipeline's: 72)"""
    samples: int = 8
    """samples per held-out problem, at T = 1 and at T = 0.6"""
    out: str = "docs/aha_results.md"
    """the markdown tables"""
    plot: str = "docs/aha.png"
    """the rollout curves"""
    measure: str = ""
    """internal: measure this model and write --measure-out (what each run does after training)"""
    measure_out: str = ""
    measure_seed: int = 0


def measure(path: str, seed: int, n: int, samples: int, max_new_tokens: int = 72) -> dict:
    """Greedy accuracy and trace_stats of `samples` samples per problem at T = 1 and T = 0.6 on n held-out problems."""
    import torch

    import rl_kernels as K
    import rlvr_rewards as env
    import toy_world as toy

    model, tokenizer = K.load_model(path)
    K.set_cpu_threads(0, model)
    rows = env.make_dataset("arithmetic", "test", n, seed)
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    out = {"greedy_accuracy": sum(env.accuracy_reward(env.sample(
        model, tokenizer, rows, num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0).completions,
        answer=answers)) / n}
    for t in (1.0, 0.6):
        generator = torch.Generator().manual_seed(seed)
        texts = env.sample(model, tokenizer, rows, num_samples=samples, max_new_tokens=max_new_tokens, temperature=t,
                           generator=generator).completions
        stats = toy.trace_stats(texts, [a for a in answers for _ in range(samples)],
                                [p for p in prompts for _ in range(samples)])
        out.update({f"t{t}/{k}": v for k, v in stats.items()})
    return out


def probe(path: str, n: int = 400, samples: int = 4, seed: int = 0) -> dict:
    """How well a base executes a hard step, asked directly: on n held-out problems with a hard step, the first
    such step's value sampled at T = 1 after a prefix of right steps (first pass), and after the same prefix with
    that step slipped by 1-3, its failed check, the verdict and "wait," (the redo). Rare in samples, so measured
    here on a forced prefix: the shares of right values, and of redos that copy the slipped value."""
    import random
    import re

    import rl_kernels as K
    import rlvr_rewards as env
    import toy_world as toy

    model, tokenizer = K.load_model(path)
    K.set_cpu_threads(0, model)
    rng, first, redo, slipped = random.Random(seed), [], [], []

    def render(item: list) -> str:  # [2, "*", 7, "=", 14] -> "2*7=14"
        return "".join(str(x) for x in item)

    for row in env.make_dataset("arithmetic", "test", 4 * n, seed):
        steps = [env.parse_step(s) for s in toy.arithmetic_trace(*toy.parse_arithmetic(row["prompt"]))]
        hard = [i for i, (a, op, b, _) in enumerate(steps) if toy.is_hard(a, op, b)]
        if not hard or len(first) == n:
            continue
        a, op, b, value = steps[hard[0]]
        wrong = toy._off(value, rng.choice(toy.SLIPS))
        head = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                             add_generation_prompt=True) + "<think>" + "".join(
            f"{x}{o}{y}={v}," for x, o, y, v in steps[:hard[0]])
        check, _ = toy.check_step(a, op, b, wrong)
        first.append((head + f"{a}{op}{b}=", value))
        redo.append((head + f"{a}{op}{b}={wrong},{render(check)},{render(toy.verdict_step(a, op, b, wrong))},wait,"
                     f"{a}{op}{b}=", value))
        slipped.append(wrong)

    def values(cases):
        texts = toy.generate_completions(model, tokenizer, [p for p, _ in cases], temperature=1.0,
                                         num_samples=samples, max_new_tokens=4, seed=seed)
        return [int(m.group()) if (m := re.match(r"[0-9]+", t)) else None for t in texts]

    expand = lambda xs: [x for x in xs for _ in range(samples)]  # noqa: E731
    got_first, got_redo = values(first), values(redo)
    return {"first_pass_right": mean([v == w for v, w in zip(got_first, expand([w for _, w in first]))]),
            "redo_right": mean([v == w for v, w in zip(got_redo, expand([w for _, w in redo]))]),
            "redo_copies_slip": mean([v == w for v, w in zip(got_redo, expand(slipped))]),
            "cases": len(first) * samples}


def rollout_curves(samples_path: str) -> dict[int, dict]:
    """trace_stats of each step's rollouts (samples.jsonl), plus the mean GRPO advantage of the reasoning samples
    that check and of those that do not (adv_check, adv_no_check)."""
    import toy_world as toy

    by_step: dict[int, list[dict]] = {}
    with open(samples_path) as f:
        for line in f:
            row = json.loads(line)
            by_step.setdefault(row["step"], []).append(row)
    curves = {}
    for step, rows in sorted(by_step.items()):
        texts = [r["completion"] for r in rows]
        prompts = [r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"] for r in rows]
        stats = toy.trace_stats(texts, None, prompts, correct=[bool(r["correct"]) for r in rows])
        checks = [any(s["check"] is not None for s in toy.read_trace(t)) for t in texts]
        reasoning = ["<think>" in t for t in texts]
        adv = [r["advantage"] for r in rows]
        curves[step] = {**stats, "adv_check": mean([a for a, c, x in zip(adv, checks, reasoning) if c and x]),
                        "adv_no_check": mean([a for a, c, x in zip(adv, checks, reasoning) if x and not c])}
    return curves


def mechanism(samples_path: str, steps: range) -> dict:
    """Over the given steps' rollouts: the share of hard first-pass steps written wrong (read_trace); per group (one
    prompt's 8 samples of one step) with both, the mean GRPO advantage of its checking reasoning samples minus that
    of its other reasoning samples (what the update pushed, problem held fixed), and the same gap in accuracy among
    the samples that finished within the token cap (what checking is worth where the cap does not bind); and the
    share of checking reasoning samples cut off by the cap (no </answer>)."""
    import toy_world as toy

    hard = wrong = 0
    groups: dict = {}
    cut = []
    with open(samples_path) as f:
        for line in f:
            row = json.loads(line)
            if row["step"] in steps and "<think>" in row["completion"]:
                trace = toy.read_trace(row["completion"])
                hard += sum(s["hard"] for s in trace)
                wrong += sum(s["hard"] and s["wrong"] for s in trace)
                checks = any(s["check"] is not None for s in trace)
                finished = "</answer>" in row["completion"]
                if checks:
                    cut.append(not finished)
                group = groups.setdefault((row["step"], str(row["prompt"])), ([], [], [], []))
                group[0 if checks else 1].append(row["advantage"])
                if finished:
                    group[2 if checks else 3].append(float(row["correct"]))
    gaps = [mean(a) - mean(b) for a, b, _, _ in groups.values() if a and b]
    finished_gaps = [mean(c) - mean(d) for _, _, c, d in groups.values() if c and d]
    return {"first_pass_wrong": wrong / max(1, hard), "gaps": gaps, "finished_gaps": finished_gaps,
            "cut": mean(cut) if cut else float("nan")}


def mechanism_table(args: Args) -> str:
    windows = {"steps 1-5": range(1, 6), "6-20": range(6, 21), "last 10": range(args.steps - 9, args.steps + 1)}
    arrow = " → ".join(windows)
    lines = ["", "**What the update pushed** (the rollouts of each window; per seed, seeds in order; in parentheses "
             "the groups or samples the column rests on):", "",
             f"| base | hard first-pass steps written wrong: {arrow} | advantage of checking minus other reasoning "
             f"samples, within a group: {arrow} | the same gap in accuracy, samples that finished within the cap | "
             f"checking samples cut off by the cap |", "|---|---|---|---|---|"]

    def gap_cell(values: list[list[float]]) -> str:
        return ", ".join(f"{mean(g):+.2f}" if g else "–" for g in values) + f" ({sum(len(g) for g in values)})"

    for world in args.worlds:
        errors, gaps, finished, cut = [], [], [], []
        for name, steps in windows.items():
            per_seed = [mechanism(os.path.join(args.root, world, f"seed{s}", "samples.jsonl"), steps)
                        for s in args.seeds]
            errors.append(", ".join(f"{100 * m['first_pass_wrong']:.1f}%" for m in per_seed))
            gaps.append(gap_cell([m["gaps"] for m in per_seed]))
            finished.append(gap_cell([m["finished_gaps"] for m in per_seed]))
            cut.append(", ".join("–" if m["cut"] != m["cut"] else f"{100 * m['cut']:.0f}%" for m in per_seed))
        cells = (" → ".join(column) for column in (errors, gaps, finished, cut))
        lines.append(f"| {LABELS[world]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def probe_table(args: Args) -> str:
    """probe() of each world's base (cached in ROOT/WORLD/probe.json)."""
    lines = ["", "**How each base executes a hard step** (`probe`: 400 held-out problems' first hard step, 4 samples "
             "each at T = 1, after a forced prefix):", "", "| base | first pass right | redo right (after a slip, its "
             "failed check and `wait`) | redo copies the slip |", "|---|---|---|---|"]
    for world in args.worlds:
        cache = os.path.join(args.root, world, "probe.json")
        if not os.path.exists(cache):
            write_whole(cache, json.dumps(probe(WORLDS[world])))
        got = json.loads(Path(cache).read_text())
        lines.append(f"| {LABELS[world]} | {100 * got['first_pass_right']:.1f}% | {100 * got['redo_right']:.1f}% | "
                     f"{100 * got['redo_copies_slip']:.1f}% |")
    return "\n".join(lines) + "\n"


def write_whole(path: str, text: str) -> None:
    """rl_runs.write_text: a stop never leaves a half-written file that a resumed sweep would trust."""
    import rl_runs

    rl_runs.write_text(path, text)


def mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def run_one(args: Args, world: str, seed: int) -> dict:
    """Train one world with one seed (unless done) and measure its final model; returns measured.json's content."""
    out_dir = os.path.join(args.root, world, f"seed{seed}")
    done = os.path.join(out_dir, "measured.json")
    if os.path.exists(done) and not args.rerun:
        results = json.load(open(done))
        results["curves"] = {int(step): row for step, row in results["curves"].items()}  # json keys are strings
        return results
    data = os.path.join(args.root, "data")
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "grpo.py", "--model", WORLDS[world], "--dataset", f"{data}/train_{seed}.jsonl",
               "--eval-dataset", f"{data}/test.jsonl", "--rewards", "accuracy", "format", "--reward-weights", "1",
               "0.1", "--seed", str(seed), "--max-steps", str(args.steps), "--lr", "2e-4",
               "--max-new-tokens", str(args.max_new_tokens),
               "--eval-every", "0", "--eval-size", str(args.eval_size), "--save-every", "10", "--log-samples", "128",
               "--no-plot", "--out-dir", out_dir, "--overwrite"]
    tick = time.time()
    with open(os.path.join(args.root, f"{world}_seed{seed}.log"), "w") as log:
        if subprocess.run(command, cwd=ROOT, env=env_vars, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"bench/aha.py: the run {world} seed {seed} failed; see {log.name}.")
        train_s = time.time() - tick
        results = {}
        for name, path in (("before", WORLDS[world]), ("after", os.path.join(out_dir, "final"))):
            target = os.path.join(out_dir, f"measure_{name}.json")
            if subprocess.run([sys.executable, __file__, "--measure", path, "--measure-out", target, "--measure-seed",
                               str(seed), "--eval-size", str(args.eval_size), "--samples", str(args.samples),
                               "--max-new-tokens", str(args.max_new_tokens)],
                              cwd=ROOT, env=env_vars, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"bench/aha.py: measuring {path} failed; see {log.name}.")
            results[name] = json.load(open(target))
    results["curves"] = rollout_curves(os.path.join(out_dir, "samples.jsonl"))
    results["train_s"] = train_s
    write_whole(done, json.dumps(results))  # measured.json marks the run done: whole or absent
    return results


def spread(values: list[float], fmt: str = ".1f", scale: float = 100.0) -> str:
    """mean ± sample standard deviation over seeds (the per-seed values in the json)."""
    values = [v * scale for v in values if v == v]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


def window(curves: dict, key: str, steps: range) -> float:
    return mean([curves[s][key] for s in steps if s in curves])


def tables(args: Args, results: dict) -> str:
    seeds = ", ".join(map(str, args.seeds))
    first, middle, last = range(1, 6), range(6, 21), range(args.steps - 9, args.steps + 1)
    flags = (f" --worlds {' '.join(args.worlds)}" if tuple(args.worlds) != tuple(WORLDS) else "") + (
        f" --max-new-tokens {args.max_new_tokens}" if args.max_new_tokens != 72 else "") + (
        f" --root {args.root}" if args.root != "runs/aha" else "")
    lines = [f"`python bench/aha.py --seeds {' '.join(map(str, args.seeds))}{flags}` (seeds {seeds}; mean ± standard "
             f"deviation over seeds; token cap {args.max_new_tokens}).", "",
             "**Rollouts during R1-Zero** (all 128 samples of each step; first 5 steps → last 10):", "",
             "| base | accuracy | check share | wait share | P(wait \\| wrong step) | P(wait \\| failed check) "
             "| reasoning length | advantage: checking − not (steps 1-5 → 6-20 → last 10) |",
             "|---|---|---|---|---|---|---|---|"]
    for world in args.worlds:
        runs = [results[world][s] for s in args.seeds if s in results[world]]
        cells = []
        for key, scale, fmt in (("accuracy", 100, ".1f"), ("check_share", 100, ".1f"), ("wait_share", 100, ".1f"),
                                ("p_wait_wrong_step", 100, ".1f"), ("p_wait_failed_check", 100, ".1f"),
                                ("reasoning_length", 1, ".1f")):
            a = spread([window(r["curves"], key, first) for r in runs], fmt, scale)
            b = spread([window(r["curves"], key, last) for r in runs], fmt, scale)
            cells.append(f"{a} → {b}")
        gap = lambda steps: [window(r["curves"], "adv_check", steps) - window(r["curves"], "adv_no_check", steps)
                             for r in runs]
        cells.append(f"{spread(gap(first), '.2f', 1)} → {spread(gap(middle), '.2f', 1)} → "
                     f"{spread(gap(last), '.2f', 1)}")
        lines.append(f"| {LABELS[world]} | " + " | ".join(cells) + " |")
    lines += ["", f"**Held-out** ({args.eval_size} test problems; {args.samples} samples each; base → after R1-Zero):",
              "", "| base | greedy | pass@1 T=0.6 | pass@1 T=1 | ≥2 hard steps, T=0.6 | check share T=0.6 | "
              "wait share T=0.6 | P(wait \\| failed check) | P(wait \\| passed check) | P(correct \\| wait) | "
              "P(correct \\| wrong, no wait) | reasoning length |", "|---" * 12 + "|"]
    for world in args.worlds:
        runs = [results[world][s] for s in args.seeds if s in results[world]]
        cells = []
        for key, scale in (("greedy_accuracy", 100), ("t0.6/accuracy", 100), ("t1.0/accuracy", 100),
                           ("t0.6/accuracy_hard2", 100), ("t0.6/check_share", 100), ("t0.6/wait_share", 100),
                           ("t0.6/p_wait_failed_check", 100), ("t0.6/p_wait_passed_check", 100),
                           ("t0.6/p_correct_wait", 100), ("t0.6/p_correct_wrong_no_wait", 100),
                           ("t0.6/reasoning_length", 1)):
            cells.append(f"{spread([r['before'][key] for r in runs], '.1f', scale)} → "
                         f"{spread([r['after'][key] for r in runs], '.1f', scale)}")
        lines.append(f"| {LABELS[world]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(args: Args, results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    for ax, (key, label) in zip(axes, CURVES):
        for world in args.worlds:
            runs = [results[world][s]["curves"] for s in args.seeds if s in results[world]]
            steps = sorted(int(s) for s in runs[0])
            values = [[c[s][key] for s in steps] for c in runs]
            smooth = [[mean(v[max(0, i - 4):i + 1]) for i in range(len(v))] for v in values]  # 5-step running mean
            avg = [mean(col) for col in zip(*smooth)]
            ax.plot(steps, avg, label=LABELS[world])
            ax.fill_between(steps, [min(col) for col in zip(*smooth)], [max(col) for col in zip(*smooth)], alpha=0.15)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("GRPO step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"R1-Zero rollouts in the verification world and its controls ({args.max_new_tokens}-token cap; "
                 f"seeds {list(args.seeds)}; 5-step running mean, band: min-max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


def main(args: Args):
    if args.measure:
        write_whole(args.measure_out, json.dumps(
            measure(args.measure, args.measure_seed, args.eval_size, args.samples, args.max_new_tokens)))
        return
    unknown = [w for w in args.worlds if w not in WORLDS]
    if unknown:
        raise SystemExit(f"bench/aha.py: unknown world {unknown[0]!r}; choose from {', '.join(WORLDS)}.")
    missing = [WORLDS[w] for w in args.worlds if not os.path.isdir(ROOT / WORLDS[w])]
    if missing:
        raise SystemExit(f"bench/aha.py: {missing[0]} is missing; build it first (toy/README.md has the command).")
    import r1_pipeline as r1

    data = os.path.join(args.root, "data")
    os.makedirs(data, exist_ok=True)
    for seed in args.seeds:  # the pipeline's R1-Zero prompts, seeded as its stage 0
        r1.write_jsonl(f"{data}/train_{seed}.jsonl", r1.reasoning_rows("train", 8000, seed))
    r1.write_jsonl(f"{data}/test.jsonl", r1.reasoning_rows("test", args.eval_size, 0))
    jobs = [(w, s) for s in args.seeds for w in args.worlds]
    results: dict = {w: {} for w in args.worlds}
    with ThreadPoolExecutor(args.jobs) as pool:
        for (world, seed), result in zip(jobs, pool.map(lambda job: run_one(args, *job), jobs)):
            results[world][seed] = result
            print(f"{world} seed {seed}: T=0.6 accuracy {result['before']['t0.6/accuracy']:.3f} -> "
                  f"{result['after']['t0.6/accuracy']:.3f}, check share {result['before']['t0.6/check_share']:.3f} -> "
                  f"{result['after']['t0.6/check_share']:.3f} ({result['train_s']:.0f} s)", flush=True)
    text = tables(args, results) + mechanism_table(args) + probe_table(args)
    print(text)
    Path(args.out).write_text("# bench/aha.py results\n\nWritten by bench/aha.py; read docs/aha.md first.\n\n" + text)
    plot(args, results)


if __name__ == "__main__":
    main(tyro.cli(Args))
