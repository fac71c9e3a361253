#!/bin/bash
# Build a base of the verification world (docs/aha.md) by continued pretraining of toy/base, 128 sequences a step:
#   checks, random_wait, wrong_redo: 400 steps of the world's "-often" corpus (checks in 60% of the reasoning traces:
#       at 15% a 0.8M-parameter model sees too few failed checks to learn what follows one), then 100 steps of the
#       world's own corpus (15%), so that checks are rare in the base again;
#   no_checks (control a, whose corpus has no checks): 400 + 250 + 100 steps of its corpus, the schedule of the
#       first build (docs/aha.md), more pretraining than the others get;
#   checks_long (the control for docs/aha.md's two readings): toy/checks continued for 2 x 600 more steps of the
#       "-often" corpus, then 100 of its own at half the learning rate, so that its redo is executed about as
#       reliably as the corpus's (one 600-step phase and 100 steps at 1e-3 left it at 78%: docs/aha.md);
#   messy (the cold start's job, docs/r1_pipeline.md): toy/checks continued for 200 steps of the toy-messy corpus
#       (reasoning rare, junk and repeated steps common).
#     toy/build_world.sh checks | no_checks | random_wait | wrong_redo | checks_long | messy   (5-30 min on one core)
set -e
cd "$(dirname "$0")/.."
d=${1:?usage: toy/build_world.sh checks|no_checks|random_wait|wrong_redo|checks_long|messy}; w=toy-${d//_/-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--preset toy_base --grad-accum 1 --save-every 100 --overwrite)
if [ "$d" = no_checks ]; then
  python sft.py "${common[@]}" --model toy --dataset $w --seed 1 --max-steps 400 --lr 1.5e-3 --warmup-steps 20 \
      --eval-every 400 --export-dir runs/worlds/$d-1 --out-dir runs/sft-world-$d-1
  python sft.py "${common[@]}" --model runs/worlds/$d-1 --dataset $w-often --seed 2 --max-steps 250 --lr 1.5e-3 \
      --warmup-steps 10 --eval-every 250 --export-dir runs/worlds/$d-2 --out-dir runs/sft-world-$d-2
elif [ "$d" = checks_long ]; then
  w=toy-checks
  python sft.py "${common[@]}" --model toy/checks --dataset $w-often --seed 4 --max-steps 600 --lr 1e-3 \
      --warmup-steps 10 --eval-every 600 --export-dir runs/worlds/$d-1 --out-dir runs/sft-world-$d-1
  python sft.py "${common[@]}" --model runs/worlds/$d-1 --dataset $w-often --seed 6 --max-steps 600 --lr 1e-3 \
      --warmup-steps 10 --eval-every 600 --export-dir runs/worlds/$d-2 --out-dir runs/sft-world-$d-2
  lr_last=5e-4
elif [ "$d" = messy ]; then
  python sft.py "${common[@]}" --model toy/checks --dataset $w --seed 5 --max-steps 200 --lr 1e-3 --warmup-steps 10 \
      --eval-every 200 --export-dir ${EXPORT_ROOT:-toy}/$d --out-dir runs/sft-world-$d
  exit
else
  python sft.py "${common[@]}" --model toy --dataset $w-often --seed 2 --max-steps 400 --lr 1.5e-3 \
      --warmup-steps 20 --eval-every 400 --export-dir runs/worlds/$d-2 --out-dir runs/sft-world-$d-2
fi
python sft.py "${common[@]}" --model runs/worlds/$d-2 --dataset $w --seed 3 --max-steps 100 --lr ${lr_last:-1e-3} \
    --warmup-steps 10 --eval-every 100 --export-dir ${EXPORT_ROOT:-toy}/$d --out-dir runs/sft-world-$d-3
