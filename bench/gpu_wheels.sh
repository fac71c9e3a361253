#!/usr/bin/env bash
# Fills .whl/ with the wheels bench/gpu_check.sh installs on a lent GPU machine. Run it HERE, where PyPI is reachable:
#   bash bench/gpu_wheels.sh          (bench/gpu_check.sh --dry-run calls it when .whl/ holds no wheel)
#
# The lent machine has no network and brings: x86_64, Python 3.12, torch 2.11.0+cu130, transformers 5.17.0,
# tokenizers 0.23.2, safetensors 0.8.0, huggingface_hub 1.33.0, numpy, matplotlib, pytest, sympy (and transformers'
# own dependencies: typer, regex, pyyaml, tqdm, ...). Against requirements.txt it lacks tyro and math-verify, and its
# transformers is below our floor. So .whl/ carries exactly these, one version each, with no dependency resolution
# (--no-deps): every dependency below was read off the wheels' METADATA (Requires-Dist), as the comments say.
# The folder travels with the tree (carry [".whl"]), and tree + .whl/ must stay under 64 MiB.
set -euo pipefail  # unlike gpu_check.sh: a half-filled .whl/ is worse than none
cd "$(dirname "$0")/.." || exit 1

WHEELS=(
  # Our floor. 5.25.0 would need huggingface-hub>=2.4 (the machine has 1.33) and kernels>=0.19.1, and hub 2.x in turn
  # httpx2, hf-xet and click>=8.4.2: a second HTTP stack carried for nothing the checks use. 5.24.0 asks for
  # huggingface-hub>=1.31, tokenizers>=0.23.1,<0.24, safetensors>=0.8, as the machine has them.
  transformers==5.24.0
  # tyro needs docstring-parser>=0.16, typeguard>=4 and typing-extensions>=4.13; typeguard 4.6 typing_extensions>=4.14,
  # newer than torch itself asks for, so the machine's copy may be too old.
  tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.16.0
  # math-verify pins latex2sympy2_extended==1.11.0, which asks for antlr4-python3-runtime>=4.9.3,<=4.13.2 and sympy
  # (on the machine).
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
)

# A fresh folder first, then swapped in: a failed download leaves .whl/ as it was. Other files in .whl/ (TRL's
# trl_site.tar.xz for bench/gpu_grpo.sh) stay, but old wheels go, so each package has one version.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest "$tmp" "${WHEELS[@]}"
mkdir -p .whl
rm -f .whl/*.whl
mv "$tmp"/*.whl .whl/

ls -l .whl/
echo ".whl/ holds $(ls .whl/*.whl | wc -l) wheels, $(du -cb .whl/* | tail -1 | cut -f1) bytes in all" \
  "($(du -cb .whl/* | tail -1 | awk '{printf "%.1f", $1 / 2^20}') MiB)."
