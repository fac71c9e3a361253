#!/usr/bin/env bash
# The GPU validation in one unattended command, for a lent H100/H200 (issue 22): no network there, one command of at
# most 10 minutes, at most 8 files back. Run bench/gpu_wheels.sh here first (the dry run does), then carry .whl/:
#   bash bench/gpu_check.sh OUT_DIR    on the GPU machine (run tool: carry [".whl"], timeout_s 600)
#   bash bench/gpu_check.sh --dry-run  here, no GPU: the plan, .whl/ and the carried size, and every part's imports on
#                                      Python 3.12 beside the GPU machine's own packages (a cached venv under /tmp)
# OUT_DIR gets four files: summary.txt (a line per part: exit code, seconds, limit, pass/fail), results.md (the tables
# to paste into the docs; printed at the end too), logs.txt (every part's output under a header), env.txt (GPU,
# versions, packages).
#
# Preflight first (stops everything at once, the reason in summary.txt): install .whl/ into /tmp/site (PYTHONPATH, so
# the machine's own site-packages stay untouched), requirements.txt's floors, CUDA, every module the parts import, and
# a few decoding steps of the committed toy model on the CPU. Then the parts, most important first, each under
# `timeout`, so a part that hangs costs only its own limit. No `set -e`: one failing part must not cost the others.

cd "$(dirname "$0")/.." || exit 1

# Most important first. Limits (s): test_cuda, the 0.5B run and logprobs keep the earlier gpu_check.sh's; generate
# has 10 s more for its free_decode_state check (one more compile); the toy run's is a guess (20 steps and 3
# evaluations take about a minute on a 2-core CPU, uncompiled). Every run pays its compile warm-ups inside its limit.
PARTS=(
  "test_cuda  100  tests/test_cuda.py: CUDA-graph decode = transformers' greedy, bf16 log-probs, host syncs"
  "generate   160  bench/generate.py: vs transformers' generate, 0.5B shape, bf16: tok/s, roofline, syncs, memory"
  "grpo_toy   120  grpo.py, 20 bf16 steps on the committed toy model: held-out accuracy at 0/10/20 must rise"
  "grpo_0.5b  100  bench/grpo_run.py: 10 GRPO steps, 0.5B shape, bf16 over fp32 masters: step split, memory"
  "logprobs    45  bench/logprobs.py: chunked vs naive log-probs at V = 151,936, bf16: memory and time"
)
BUDGET=570  # seconds for the whole script: the device kills a command at 600
CARRY_LIMIT=$((64 * 2**20))  # tree + carried folders
DRY_ENV=/tmp/gpu_check_py312  # the dry run's venv, kept between dry runs
# The GPU machine's own packages, which the dry run's venv copies (torch: PyPI has only the CUDA build for
# Python 3.12 on x86_64; it runs on the CPU here).
GPU_PACKAGES="torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 huggingface_hub==1.33.0
              numpy matplotlib pytest sympy"

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1  # no network there: a hub lookup would only wait for its timeout
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/gpu_check_inductor}  # later parts reuse kernels

# ---------------------------------------------------------------------------------------------------------------
# The parts. Each runs in its own bash (timeout needs a process), with PY, WORK and DRY exported. In the dry run
# (DRY=1) a script gets its real command line, which is parsed (tyro) before the script stops short of its main: a
# flag renamed since shows there, not on the GPU; pytest only collects.
# A table_NAME function, run after the part and outside its timeout, prints the part's markdown from what it left in
# WORK, so a part cut short still reports what it measured; its exit status is the part's verdict beyond its own.
# ---------------------------------------------------------------------------------------------------------------

py_script() {  # SCRIPT ARGS...: python SCRIPT ARGS, or in the dry run: import SCRIPT, parse ARGS, stop
  if [ -z "$DRY" ]; then "$PY" "$@"; return; fi
  "$PY" -c '
import os, runpy, sys
import tyro

parse = tyro.cli
def parse_only(*args, **kwargs):
    print("parsed:", parse(*args, **kwargs))
    sys.exit(0)
tyro.cli = parse_only  # every script reaches its main through tyro.cli
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python SCRIPT` would
runpy.run_path(sys.argv[0], run_name="__main__")
sys.exit("never reached tyro.cli")' "$@"
}

part_test_cuda() {
  "$PY" -m pytest -q -rA -p no:cacheprovider ${DRY:+--collect-only} tests/test_cuda.py
}
table_test_cuda() {
  echo "### tests/test_cuda.py"
  echo
  echo '```'
  grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) |(passed|failed|skipped|error|no tests ran).* in [0-9.]+s' \
    "$WORK/test_cuda.log"
  echo '```'
}

part_generate() {
  py_script bench/generate.py --device cuda --runs 2 --out "$WORK/generate.md"
}

part_grpo_toy() {
  py_script grpo.py --max-steps 20 --eval-every 10 --eval-samples 0 --dtype bfloat16 \
    --out-dir "$WORK/grpo_toy" --overwrite
}
table_grpo_toy() {  # held-out greedy accuracy from the run's metrics.jsonl; "learns": the last above step 0
  "$PY" - "$WORK/grpo_toy" <<'EOF'
import json, os, statistics, sys

run = sys.argv[1]
args = json.load(open(os.path.join(run, "args.json"))) if os.path.exists(os.path.join(run, "args.json")) else {}
rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] \
    if os.path.exists(os.path.join(run, "metrics.jsonl")) else []
evals = {r["step"]: r for r in rows if "eval/accuracy" in r}
steps = [r["perf/step_s"] for r in rows if "perf/step_s" in r]
print(f"### grpo.py on the committed toy model, {args.get('max_steps', '?')} steps\n")
print(f"dtype {args.get('dtype')} over {args.get('master_dtype')} masters, compile {args.get('compile')}, "
      f"B x G = {args.get('prompts_per_step')} x {args.get('num_generations')}; held-out greedy accuracy on "
      f"{args.get('eval_size')} prompts" + (f"; median step {statistics.median(steps):.2f} s, first step "
                                             f"{steps[0]:.1f} s (compiles)" if steps else "") + ".\n")
print("| step | held-out accuracy | reasoning share | response length |\n|---|---|---|---|")
for step, r in sorted(evals.items()):
    print(f"| {step} | {r['eval/accuracy']:.1%} | {r['eval/reasoning_share']:.0%} | {r['eval/response_length']:.1f} |")
if not rows:
    print("\nThe run left no metrics (logs.txt has its output).")
last = args.get("max_steps")
learns = 0 in evals and last in evals and evals[last]["eval/accuracy"] > evals[0]["eval/accuracy"]
print(f"\nLearns (accuracy at step {last} above step 0): {'yes' if learns else 'NO'}.")
sys.exit(0 if learns else 1)
EOF
}

part_grpo_0.5b() {
  py_script bench/grpo_run.py --device cuda --out "$WORK/grpo_0.5b.md"
}

part_logprobs() {
  py_script bench/logprobs.py --device cuda --out "$WORK/logprobs.md"
}

export -f py_script part_test_cuda part_generate part_grpo_toy part_grpo_0.5b part_logprobs

# ---------------------------------------------------------------------------------------------------------------

fail_preflight() {  # MESSAGE: the one line summary.txt keeps, then stop
  echo "preflight FAILED: $1" | tee -a "$OUT/summary.txt"
  exit 1
}

install_wheels() {  # the carried .whl/ into $SITE, ahead of the machine's site-packages on PYTHONPATH
  ls .whl/*.whl > /dev/null 2>&1 || return 0
  rm -rf "$SITE"
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  else  # a venv made without pip: every wheel we carry is pure Python, so unpacking one is installing it
    for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || return 1; done
  fi || return 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

preflight() {  # versions against requirements.txt, CUDA (not in the dry run), imports, a CPU decoding smoke test
  install_wheels || fail_preflight "could not install .whl/ into $SITE (the output above)"
  "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib, importlib.metadata as metadata, os, re, sys

from packaging.version import Version  # a dependency of transformers, so always there

problems = []
print(f"python {sys.version.split()[0]} ({sys.executable}); PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
for line in open("requirements.txt"):
    floor = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^\s#;,]+)", line)
    if not floor:
        continue
    name, least = floor.groups()
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        problems.append(f"{name} is not installed (requirements.txt: >={least})")
        continue
    where = metadata.distribution(name).locate_file("")
    print(f"  {name:14} {have:16} floor {least:8} {'ok' if Version(have) >= Version(least) else 'TOO OLD'}  {where}")
    if Version(have) < Version(least):
        problems.append(f"{name} {have} is below requirements.txt's floor {least}")

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"))
if not os.environ.get("DRY") and not torch.cuda.is_available():
    problems.append("torch sees no CUDA device")

# Every module a part imports: the project's, the bench scripts' (as modules: their main() does not run), and what
# they import inside functions. A missing one shows here in seconds instead of minutes into a part.
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "bench"), os.path.join(os.getcwd(), "tests")]
for module in ["tyro", "math_verify", "safetensors.torch", "matplotlib.pyplot", "pytest", "transformers.masking_utils",
               "transformers.integrations.sdpa_attention", "torch._dynamo", "rl_kernels", "rl_runs", "rlvr_rewards",
               "sandbox", "toy_world", "grpo", "conftest", "generate", "logprobs", "grpo_step", "grpo_run"]:
    try:
        importlib.import_module(module)
    except Exception as e:
        problems.append(f"import {module}: {type(e).__name__}: {e}")
if not problems:  # the code paths the parts lean on, for real, in seconds on the CPU
    try:
        from math_verify import parse, verify

        assert verify(parse("$\\frac{1}{2}$"), parse("$0.5$")), "math_verify: 1/2 != 0.5"
        import rl_kernels as K
        import toy_world as toy

        import transformers

        transformers.utils.logging.disable_progress_bar()
        model, tokenizer = K.load_model(toy.TOY_BASE, device="cpu")
        ids = torch.randint(3, len(tokenizer), (2, 6))
        mask = torch.ones_like(ids)
        gen = K.generate(model, ids, mask, max_new_tokens=8, num_samples=2, eos_token_id=-1, pad_token_id=0,
                         noise_keys=torch.arange(4), compile=False)
        full = torch.cat([ids.repeat_interleave(2, 0), gen.tokens], 1)
        logprobs = K.token_logprobs(model, full, torch.ones_like(full), last_n=8)
        assert torch.allclose(logprobs, gen.logprobs, atol=1e-4), "sampled log-probs != token_logprobs"
        print("smoke test: math_verify, toy model load, K.generate, K.token_logprobs: ok")
    except Exception as e:
        problems.append(f"smoke test: {type(e).__name__}: {e}")
for problem in problems:
    print("PROBLEM:", problem)
sys.exit(1 if problems else 0)
EOF
  [ "${PIPESTATUS[0]}" = 0 ] || fail_preflight "$(grep -m1 '^PROBLEM' "$OUT/env.txt" | cut -c10-) (all in env.txt)"
}

run_part() {  # NAME LIMIT: run it under timeout, log it, record the verdict, append its table to results.md
  local name=$1 limit=$2 start=$SECONDS rc verdict
  echo; echo "==== $name (limit ${limit}s)"
  printf '\n==== part %s: limit %ss, started %s\n' "$name" "$limit" "$(date -u +%T)" >> "$OUT/logs.txt"
  timeout -k 10 "$limit" bash -c "part_$name" > "$WORK/$name.log" 2>&1
  rc=$?
  cat "$WORK/$name.log" >> "$OUT/logs.txt"
  tail -n 3 "$WORK/$name.log"
  verdict=pass
  if [ -n "$DRY" ]; then
    [ $rc = 0 ] || verdict=fail
  elif declare -F "table_$name" > /dev/null; then
    { echo; "table_$name"; } >> "$WORK/$name.table" 2>&1 || verdict=fail
  elif [ -f "$WORK/$name.md" ]; then
    { echo; cat "$WORK/$name.md"; } > "$WORK/$name.table"
  fi
  [ $rc = 0 ] || verdict=fail
  [ $rc = 124 ] || [ $rc = 137 ] && verdict="fail (timed out)"
  [ -f "$WORK/$name.table" ] && cat "$WORK/$name.table" >> "$OUT/results.md"
  printf '%-10s rc=%-3s %4ss / %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" "$verdict" \
    | tee -a "$OUT/summary.txt"
}

print_plan() {
  local total=0 line
  echo "Plan (each part under timeout -k 10; the whole script within ${BUDGET}s, later parts' limits cut to fit):"
  echo "  preflight       install .whl/ -> $SITE, requirements.txt floors, CUDA, imports, CPU decoding smoke test"
  for line in "${PARTS[@]}"; do
    read -r name limit what <<< "$line"
    printf '  %-10s %4ss  %s\n' "$name" "$limit" "$what"
    total=$((total + limit))
  done
  echo "  total of the limits: ${total}s ($((total / 60)) min $((total % 60)) s) + preflight; budget ${BUDGET}s"
}

find_python312() {  # the pyenv shim refuses python3.12 unless 3.12 is a selected version: try its real path too
  local c
  for c in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2> /dev/null && echo "$c" && return
  done
  return 1
}

dry_run() {
  export DRY=1
  OUT=$(mktemp -d /tmp/gpu_check_dry.XXXX) WORK=$OUT/work SITE=$DRY_ENV/site
  export WORK
  mkdir -p "$WORK"
  print_plan
  echo
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo ".whl/ holds no wheel: bench/gpu_wheels.sh"
    bash bench/gpu_wheels.sh || { echo "FAILED: bench/gpu_wheels.sh"; exit 1; }
  fi
  echo ".whl/: $(ls .whl | tr '\n' ' ')"
  local tree whl
  tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2> /dev/null | awk '{s += $1} END {print s}')
  whl=$(find .whl -type f -exec stat -c %s {} + | awk '{s += $1} END {print s}')
  awk -v t="$tree" -v w="$whl" -v l="$CARRY_LIMIT" 'BEGIN {
    printf "carried: tree %.1f MiB + .whl/ %.1f MiB = %.1f MiB of %d MiB\n", t / 2^20, w / 2^20, (t + w) / 2^20, l / 2^20 }'
  [ $((tree + whl)) -le $CARRY_LIMIT ] || { echo "FAILED: over the carry limit"; exit 1; }

  PY=$DRY_ENV/venv/bin/python
  export PY
  if [ "$(cat "$DRY_ENV/packages" 2> /dev/null)" != "$GPU_PACKAGES" ] || ! "$PY" -c "" 2> /dev/null; then
    local py312
    py312=$(find_python312) || { echo "FAILED: no Python 3.12 here (set PYTHON312=/path/to/python3.12)"; exit 1; }
    echo "building the GPU machine's Python 3.12 packages in $DRY_ENV (once; several GB, minutes): $GPU_PACKAGES"
    rm -rf "$DRY_ENV" && mkdir -p "$DRY_ENV" && "$py312" -m venv "$DRY_ENV/venv" \
      && "$PY" -m pip install -q --no-cache-dir $GPU_PACKAGES 2>&1 | grep -v "is ignored" \
      || { echo "FAILED: building $DRY_ENV"; exit 1; }
    echo "$GPU_PACKAGES" > "$DRY_ENV/packages"
  fi
  echo "preflight as on the GPU machine, with $PY (no CUDA check):"
  preflight
  echo "preflight ok" >> "$OUT/summary.txt"
  for line in "${PARTS[@]}"; do
    read -r name limit _ <<< "$line"
    run_part "$name" 120 > /dev/null
  done
  echo
  cat "$OUT/summary.txt"
  if grep -q fail "$OUT/summary.txt"; then
    echo "FAILED: see $OUT/logs.txt"
    exit 1
  fi
  echo "dry run ok: every part's command line parses and imports on Python 3.12 with the carried wheels (logs: $OUT)"
}

# ---------------------------------------------------------------------------------------------------------------

case ${1:-} in
  --dry-run) dry_run; exit ;;
  ""|-*) echo "usage: bash bench/gpu_check.sh OUT_DIR | --dry-run"; exit 2 ;;
esac

mkdir -p "$1" && OUT=$(cd "$1" && pwd)  # absolute: the parts run from the repository root
WORK=$(mktemp -d /tmp/gpu_check.XXXX) SITE=/tmp/site PY=${PYTHON:-python3} DRY=
export PY WORK DRY
: > "$OUT/summary.txt"; : > "$OUT/logs.txt"; : > "$OUT/env.txt"

{ date -u; nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv
  echo; } >> "$OUT/env.txt" 2>&1
print_plan | tee -a "$OUT/logs.txt"
start=$SECONDS
preflight
echo "preflight ok ($((SECONDS - start))s)" | tee -a "$OUT/summary.txt"
"$PY" -m pip list 2> /dev/null | grep -iE '^(torch|triton|transformers|tokenizers|safetensors|huggingface.hub|tyro|math.verify|latex2sympy2.extended|antlr4|typeguard|typing.extensions|docstring.parser|numpy|matplotlib|pytest|sympy|tqdm|nvidia)\s' \
  >> "$OUT/env.txt"  # a package in both places shows as the carried copy, the one imported

{ echo "## GPU check, $(date -u +%F): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  echo
  echo "\`bash bench/gpu_check.sh\` at $(git rev-parse --short HEAD 2> /dev/null || echo "an unknown commit")" \
    "$(git status --porcelain 2> /dev/null | grep -q . && echo "(with local changes)"); $(grep -m1 '^torch ' "$OUT/env.txt")."
} > "$OUT/results.md"

for line in "${PARTS[@]}"; do
  read -r name limit _ <<< "$line"
  left=$((BUDGET - SECONDS - 15))  # 15 s: the kill grace and this script's own ending
  if [ "$left" -lt 20 ]; then
    printf '%-10s skipped: %ss of the budget left\n' "$name" "$left" | tee -a "$OUT/summary.txt"
    continue
  fi
  run_part "$name" $((limit < left ? limit : left))
done

echo "total $SECONDS s" | tee -a "$OUT/summary.txt"
echo
echo "======== summary.txt"
cat "$OUT/summary.txt"
echo
echo "======== results.md: paste into the docs"
cat "$OUT/results.md"
