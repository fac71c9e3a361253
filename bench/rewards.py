"""Throughput of the rewards on a batch of 512 completions, so a user can see a reward will not be the
bottleneck of a training step. Prints a table of samples/s.

    python bench/rewards.py [--n 512] [--workers N]
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlvr_rewards as env  # noqa: E402
import sandbox  # noqa: E402


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    values = fn(*args, **kwargs)
    return values, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="completions per batch")
    parser.add_argument("--workers", type=int, default=None, help="code_reward's max_workers (default 4 per CPU)")
    args = parser.parse_args()
    rng, n = random.Random(0), args.n

    # Numbers (the arithmetic task): every check takes the Fraction fast path.
    rows = env.make_dataset("arithmetic", "test", n=n)
    numeric = [f"<think>{' '.join(r['steps'])}</think><answer>{int(r['answer']) + rng.choice((0, 0, 1))}</answer>"
               for r in rows]
    numeric_gold = [r["answer"] for r in rows]
    # LaTeX answers against plain golds: every check goes to math-verify's worker processes.
    pairs = [(rng.randint(1, 999), rng.randint(2, 999)) for _ in range(n)]
    scales = [rng.randint(1, 3) for _ in range(n)]
    latex = [f"so \\boxed{{\\frac{{{a * k}}}{{{b * k}}}}}" for (a, b), k in zip(pairs, scales)]
    latex_gold = [f"{a}/{b}" if rng.random() < 0.5 else f"{a + 1}/{b}" for a, b in pairs]
    # Code: the reference solutions of the code task (all pass) and broken ones (all fail).
    code_rows = env.make_dataset("code", "test", n=n)
    broken = "```python\ndef f(*args):\n    return None\n```"
    code = [f"```python\n{row['answer']}```" if i % 2 else broken for i, row in enumerate(code_rows)]
    tests = [r["tests"] for r in code_rows]

    _, pool_start = timed(env.accuracy_reward, ["\\boxed{\\frac{1}{2}}"], ["0.5"])  # starts the math-verify workers
    _, probe = timed(sandbox._probe_sandbox)
    cases = [
        ("accuracy_reward", "numbers (fast path)", lambda: env.accuracy_reward(numeric, numeric_gold)),
        ("accuracy_reward", "LaTeX (math-verify)", lambda: env.accuracy_reward(latex, latex_gold)),
        ("format_reward", "R1 template", lambda: env.format_reward(numeric)),
        ("code_reward", f"4 asserts, workers={args.workers or min(32, 4 * os.cpu_count())}",
         lambda: env.code_reward(code, tests, max_workers=args.workers)),
    ]
    print(f"CPUs: {os.cpu_count()}   math-verify workers: {len(sandbox._math_pool()[0])} (start {pool_start:.2f} s)   "
          f"sandbox: {sandbox._probe_sandbox()} (probe {probe:.2f} s)\n")
    print(f"| {'reward':<16} | {'case':<26} | {'samples':>7} | {'seconds':>8} | {'samples/s':>10} |")
    print(f"|{'-' * 18}|{'-' * 28}|{'-' * 9}|{'-' * 10}|{'-' * 12}|")
    for name, case, run in cases:
        values, seconds = timed(run)
        assert len(values) == n
        print(f"| {name:<16} | {case:<26} | {n:>7} | {seconds:>8.3f} | {n / seconds:>10.0f} |")


if __name__ == "__main__":
    main()
