#!/usr/bin/env bash
# Every GPU benchmark in one go, for a lent H100/H200; about 6 minutes including torch.compile warm-up.
#   bash bench/gpu.sh OUT_DIR     ->  OUT_DIR/{gpu.txt, logprobs_gpu.md, generate_gpu.md, *.log}
# Each run is bounded by `timeout`; both scripts rewrite their table after every row, so a run cut short still
# leaves the rows it finished. No `set -e`: one failing benchmark must not cost the other its table.
set -x
OUT=${1:?usage: bash bench/gpu.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: we cd to the repository root next
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
export TORCH_LOGS=recompiles  # a recompile during the timed generate runs would show here

nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.version.cuda)" \
  | tee -a "$OUT/gpu.txt"

# Chunked vs naive log-probs, bf16, hidden 896, V = 151,936, 1,024 ... 8,192 tokens: ~30 s (15 s of it start-up).
timeout 60 python bench/logprobs.py --device cuda --out "$OUT/logprobs_gpu.md" 2>&1 | tee "$OUT/logprobs_gpu.log"

# generate vs transformers, Qwen2.5-0.5B-shaped bf16, 8x8 and 32x8 rows, 128-token prompts, 512 new tokens, 3 runs;
# each shape compiles its CUDA-graph decode step once in the untimed warm-up (~1-2 min per shape).
timeout 290 python bench/generate.py --device cuda --out "$OUT/generate_gpu.md" 2>&1 | tee "$OUT/generate_gpu.log"

ls -l "$OUT"
