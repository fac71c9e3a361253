#!/usr/bin/env bash
# GRPO step on a lent GPU: grpo.py vs TRL's GRPOTrainer without vLLM, bf16, ~4 minutes including compile warm-up.
#   bash bench/gpu_grpo.sh OUT_DIR   ->  OUT_DIR/{gpu.txt, grpo_step_gpu_0.5b.md, grpo_step_gpu_100m.md, *.log}
# Models: Qwen2.5-0.5B's shape (64 rows) and the 100.7M one (128 rows), random weights, 256 new tokens, one warm-up
# step (our decode-step compile happens there) and 2 timed steps per side. Each run is bounded by `timeout`, and
# grpo_step.py rewrites its table after every side, so a run cut short keeps the rows it finished.
#
# TRL is not a dependency of the project and the GPU machine has no network, so it must arrive with the tree,
# under the git-ignored .whl/ folder (carry it: carry=[".whl"]), in one of two forms (Python 3.12, x86_64):
#   .whl/*.whl              the wheels themselves (~70 MB with pyarrow: over the 64 MiB carry limit), made with
#       pip download trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#         pandas==3.1.1 psutil==7.2.2 pyarrow==26.0.1 xxhash==4.1.0 --no-deps --only-binary=:all: \
#         --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
#         --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d wheels/
#   .whl/trl_site.tar.xz    the same wheels unpacked and xz-compressed (~47 MB), made with
#       for w in wheels/*.whl; do unzip -q -o "$w" -d site; done; tar -cJf .whl/trl_site.tar.xz -C site .
# (the packages TRL needs beyond these, e.g. fsspec, python-dateutil, huggingface_hub, are transformers' or
# torch's own dependencies). Without TRL the script still times grpo.py alone.
# No `set -e`: one failing run must not cost the other its table.
set -x
OUT=${1:?usage: bash bench/gpu_grpo.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

if ! python -c "import trl" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    pip install --quiet --no-index --no-deps .whl/*.whl 2>&1 | tail -3
  elif [ -f .whl/trl_site.tar.xz ]; then
    SITE=$(mktemp -d)
    tar -xJf .whl/trl_site.tar.xz -C "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
TRL_FLAG=""
if python -c "from trl import GRPOTrainer; print('trl', __import__('trl').__version__)" 2>&1 | tee -a "$OUT/gpu.txt" \
    | grep -q '^trl '; then :; else TRL_FLAG="--no-trl"; echo "TRL not importable: timing grpo.py alone" | tee -a "$OUT/gpu.txt"; fi

# Qwen2.5-0.5B shape, 8 prompts x 8 samples, 256 new tokens: ours ~1-2 min (mostly the decode-step compile), TRL ~40 s.
timeout 150 python bench/grpo_step.py --device cuda --models qwen2.5-0.5b $TRL_FLAG \
  --out "$OUT/grpo_step_gpu_0.5b.md" 2>&1 | tee "$OUT/grpo_step_gpu_0.5b.log" | grep -v "^grpo:"
# 100.7M parameters, 16 prompts x 8 samples, 256 new tokens.
timeout 100 python bench/grpo_step.py --device cuda --models 100m $TRL_FLAG \
  --out "$OUT/grpo_step_gpu_100m.md" 2>&1 | tee "$OUT/grpo_step_gpu_100m.log" | grep -v "^grpo:"

ls -l "$OUT"
