#!/bin/bash
# Build a base of the verification world (docs/aha.md) by continued pretraining of toy/base, in three phases:
#   1. 400 steps of 128 sequences of the world's corpus (checks in 15% of the reasoning traces);
#   2. 250 steps with checks in 60% of them (the world's "-often" corpus): at 15% a 0.8M-parameter model sees too
#      few failed checks to learn that "wait" follows one (after phase 1 alone: P(wait | failed check) 0.20 against
#      0.33 after a passed check, checks on 4% of hard steps);
#   3. 100 steps back at 15%, so that checks are rare in the base again.
#     toy/build_world.sh checks | no_checks | random_wait | wrong_redo      (about 15 min alone on one core)
set -e
cd "$(dirname "$0")/.."
d=${1:?usage: toy/build_world.sh checks|no_checks|random_wait|wrong_redo}; w=toy-${d//_/-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--preset toy_base --grad-accum 1 --save-every 100 --overwrite)
python sft.py "${common[@]}" --model toy --dataset $w --seed 1 --max-steps 400 --lr 1.5e-3 --warmup-steps 20 \
    --eval-every 400 --export-dir runs/worlds/$d-1 --out-dir runs/sft-world-$d-1
python sft.py "${common[@]}" --model runs/worlds/$d-1 --dataset $w-often --seed 2 --max-steps 250 --lr 1.5e-3 \
    --warmup-steps 10 --eval-every 250 --export-dir runs/worlds/$d-2 --out-dir runs/sft-world-$d-2
python sft.py "${common[@]}" --model runs/worlds/$d-2 --dataset $w --seed 3 --max-steps 100 --lr 1e-3 \
    --warmup-steps 10 --eval-every 100 --export-dir toy/$d --out-dir runs/sft-world-$d-3
