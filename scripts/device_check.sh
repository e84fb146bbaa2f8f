#!/usr/bin/env bash
# Every GPU check of this project in one command, for the rare slot on a GPU machine:
#
#   scripts/device_check.sh OUT               # one CUDA GPU (H200: about 8 minutes)
#   scripts/device_check.sh --cpu-smoke OUT   # the same functions on the CPU at tiny sizes
#   scripts/device_check.sh OUT2 --only compile,fit_16_mixed --budget 200   # a rerun of some
#
# Writes OUT/device_check.json and OUT/device_check.md (rewritten after every check, so a run
# cut short keeps its results), OUT/logs/ (subprocess output, tracebacks) and OUT/bench/
# (benchmark JSON), and prints a summary. Each check passes or fails with its numbers; one
# failing does not stop the others. Exit status 1 if a check failed or a required one did not
# run, 2 on a bad argument. The checks live in refiner_pl/device_check.py.
#
# Budget on one H200 (16 cores), seconds, in running order; the run stops starting checks
# at 465 s. Estimates, as this script has not yet run on a GPU:
#   start-up: imports, CUDA, generated images (4 classes x 56 PNG/JPEG)        15
#   environment (GPU, versions)                                                  5
#   release_fixture: fp32 on CUDA <= 1e-5, TF32 off; channels-last refiner      10
#   fused_cpu_path: the fused CPU refiner never runs in CUDA training            5
#   autocast_logits: bf16/fp16 vs fp32, eval and train, S and its plain twin    12
#   compile: dynamo graph breaks (4 variants) + inductor vs eager, 3 steps      45
#   fit_16_mixed, fit_bf16_mixed: cli.py fit refiner_vit_s, 224 px, 30 steps  25+25
#   resume_last: 3 epochs, stop, --ckpt_path last to 5, vs the bf16 fit         30
#   ddp_one_gpu: cli.py fit, ddp_bf16.yaml, SyncBatchNorm, own process          35
#   fsdp_one_gpu: cli.py fit, fsdp_bf16.yaml, L at 448, 8 steps, own process    40
#   benchmark eager, bf16, vs DeiT-S/B: S/M/L 224 (batch 64), L 448 refiner /
#     block / no checkpointing (batch 8), each its own process          15+18+20+25+25+20
#   benchmark S 224 compiled (inductor)                                        100
#   total                                                                      ~480
# Optional, only when time is left (else reported as skipped): compiled L 448 refiner
# checkpointing (150), M 224 (120), L 224 (150), L 448 block checkpointing (150); run them
# alone with e.g. --only "benchmark L 448 refiner ckpt compiled" --budget 200.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
exec "$python" -m refiner_pl.device_check "$@"
