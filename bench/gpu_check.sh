#!/usr/bin/env bash
# The GPU validation of issue 11 in one go, for a lent H100/H200: every part is bounded by `timeout` (at most 475 s
# in all, under 8 minutes) and writes its own file as it goes, so a run cut short keeps what it measured.
#   bash bench/gpu_check.sh OUT_DIR   ->  OUT_DIR/{gpu.txt, test_cuda.txt, logprobs_gpu.md, generate_gpu.md,
#                                                   grpo_0.5b_plain.md, grpo_0.5b_fsdp.md, summary.txt, *.log}
#  1. tests/test_cuda.py: CUDA-graph decode = transformers' greedy, bf16 log-probs with the fp32 head, mixed-precision
#     sampler vs trainer under CUDA graphs, host syncs per call, compiled loss (100 s)
#  2. log-probs: chunked vs naive at V = 151,936, bf16 (45 s)
#  3. generate vs transformers' generate: Qwen2.5-0.5B shape, bf16, 64 and 256 rows x 512 new tokens: tok/s, share of
#     the bandwidth roofline, graphs compiled while timed, host syncs per decode step (150 s)
#  4. grpo.main for 10 steps on a 0.5B-shaped random model, bf16 compute / fp32 master weights, compiled decoding:
#     one process, then FSDP2 over a process group of one (90 s each)
# No `set -e`: one failing part must not cost the others their tables. The GRPO step against TRL is
# bench/gpu_grpo.sh (it needs TRL's wheels carried in).
set -x
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: we cd to the repository root next
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/gpu_check_inductor}  # later parts reuse kernels
: > "$OUT/summary.txt"
part() {  # part NAME SECONDS COMMAND...: run, keep its log, record its exit status and time
  local name=$1 seconds=$2 start=$SECONDS
  shift 2
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s (limit ${seconds}s)" | tee -a "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.version.cuda)" \
  | tee -a "$OUT/gpu.txt"

part test_cuda 100 python -m pytest -q -rA -s tests/test_cuda.py
cp "$OUT/test_cuda.log" "$OUT/test_cuda.txt"
part logprobs_gpu 45 python bench/logprobs.py --device cuda --out "$OUT/logprobs_gpu.md"
part generate_gpu 150 env TORCH_LOGS=recompiles python bench/generate.py --device cuda --runs 2 \
  --out "$OUT/generate_gpu.md"
part grpo_0.5b_plain 90 python bench/grpo_run.py --device cuda --out "$OUT/grpo_0.5b_plain.md"
part grpo_0.5b_fsdp 90 python bench/grpo_run.py --device cuda --strategy fsdp --out "$OUT/grpo_0.5b_fsdp.md"

ls -l "$OUT"
