#!/bin/bash
# The checks to run when a machine with a CUDA GPU is at hand for a few minutes, as one script
# (docs/benchmarks.md, "On a GPU"). Three verbs:
#
#   bash benchmarks/gpu_session.sh prepare DEST        # here: a JPEG copy of ../shared CamVid (30 MB
#                                                       #   instead of 122 MB; masks stay PNG, untouched)
#   bash benchmarks/gpu_session.sh checks DATA OUT [EPOCHS] [SEEDS] [BOX]
#       # there: the CUDA tests, benchmarks/gpu_check.py (CUDA training, the bundle scored on the
#       # CPU and on CUDA), a one-process torchrun semi-supervised training on CUDA (one process
#       # forms no process group, so this does not reach NCCL: that needs two GPUs), and beside
#       # them issue 18's pairs (46 labelled / 321 unlabelled, supervised and semi-supervised per
#       # seed, default 120 epochs, seeds "6 7"), each stopped after BOX seconds (default 470)
#   bash benchmarks/gpu_session.sh throughput DATA OUT  # there: img/s and s/epoch with 12 loader
#       # workers and nothing else running (CamVid supervised; the issue-18 arms for 4 epochs)
#
# Runs from the repository root with PYTHONPATH set to it (no install needed: the training path
# needs torch, numpy, Pillow, OpenCV and tqdm only; tracking is off). Results land in OUT
# (checks.log, pytest.log, results.tgz with each run's metrics.jsonl and model.json).
set -u
verb=${1:?prepare, checks or throughput}
R=$(pwd)
export PYTHONPATH=$R PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}

split() {  # the benchmark's split (seed 0) of DATA into $W/camvid-46 and $W/camvid-unlabelled-321
  $PY -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from semi_camvid import split
split(Path('$1'), Path('$2'), 46, 0)"
}

case $verb in
prepare)
  dest=${2:?DEST}
  $PY - "$R/../shared/datasets/camvid" "$dest" <<'EOF'
import shutil, sys
from pathlib import Path
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for split in ("train", "val"):
    for kind in ("images", "annotations"):
        (dst / kind / split).mkdir(parents=True, exist_ok=True)
    for p in sorted((src / "images" / split).iterdir()):
        Image.open(p).convert("RGB").save(dst / "images" / split / f"{p.stem}.jpg", quality=92)
    for p in sorted((src / "annotations" / split).iterdir()):
        shutil.copy(p, dst / "annotations" / split / p.name)
shutil.copy(src / "dataset_meta.json", dst / "dataset_meta.json")
EOF
  du -sh "$dest" ;;
checks)
  DATA=${2:?DATA}; OUT=${3:?OUT}; EP=${4:-120}; SEEDS=${5:-"6 7"}; BOX=${6:-470}
  W=$(mktemp -d); mkdir -p "$OUT"; T0=$(date +%s)
  { nvidia-smi -L; $PY -c "import sys, torch; print(sys.version, torch.__version__, torch.cuda.is_available())"; } > "$OUT/env.txt" 2>&1
  split "$DATA" "$W" > "$W/split.log" 2>&1
  S="Lite-HRNet-s-mod2 --train-data-root $W/camvid-46 --epochs $EP --precision auto --recipe default --num-workers 3
     --no-tracking --early-stop-patience 0 --plateau-patience 40 --device cuda"
  U="--unlabeled-data-root $W/camvid-unlabelled-321 --unlabeled-mix cutmix --pseudo-threshold 0.95 --unlabeled-weight 0.5
     --unlabeled-rampup 10"
  for s in $SEEDS; do
    timeout "$BOX" $PY -m segcore.cli train $S --seed "$s" --output "$W/runs/sup-s$s" > "$W/sup-s$s.log" 2>&1 &
    timeout "$BOX" $PY -m segcore.cli train $S $U --seed "$s" --output "$W/runs/semi-s$s" > "$W/semi-s$s.log" 2>&1 &
  done
  timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_devices.py \
    -k "cuda and not bundle_scores and not eval_and_predict" > "$W/pytest.log" 2>&1  # those two need MLflow and OpenVINO
  {
    timeout 200 $PY benchmarks/gpu_check.py --epochs 2 --data "$DATA" --num-workers 3 --work "$W/gc" 2>&1 | tail -n 8
    for d in cpu cuda; do
      timeout 100 $PY -m segcore.cli eval "$W/gc/run" --test-data-root "$W/gc/run/dataset" --device $d --json --no-tracking 2>&1 | tail -n 1
    done
    timeout 150 torchrun --standalone --nproc_per_node 1 -m segcore.cli train $S $U --epochs 2 --seed 9 --output "$W/ddp1" 2>&1 | tail -n 6
    echo "checks done at $(( $(date +%s) - T0 )) s"
  } > "$W/checks.log" 2>&1
  wait
  echo "all done at $(( $(date +%s) - T0 )) s" >> "$W/checks.log"
  (cd "$W" && tar czf "$OUT/results.tgz" ./*.log runs/*/metrics.jsonl runs/*/model.json ddp1/model.json 2>/dev/null)
  cp "$W/checks.log" "$W/pytest.log" "$OUT/" ;;
throughput)
  DATA=${2:?DATA}; OUT=${3:?OUT}
  W=$(mktemp -d); mkdir -p "$OUT"
  split "$DATA" "$W" > "$W/split.log" 2>&1
  {
    timeout 100 $PY benchmarks/gpu_check.py --epochs 2 --data "$DATA" --num-workers 12 --work "$W/gc" 2>&1 | grep -E "epoch|device"
    S="Lite-HRNet-s-mod2 --train-data-root $W/camvid-46 --epochs 4 --precision auto --recipe default --num-workers 12
       --no-tracking --early-stop-patience 0 --device cuda --seed 1"
    timeout 60 $PY -m segcore.cli train $S --output "$W/sup" 2>&1 | grep epoch
    timeout 70 $PY -m segcore.cli train $S --unlabeled-data-root "$W/camvid-unlabelled-321" --unlabeled-mix cutmix \
      --pseudo-threshold 0.95 --unlabeled-weight 0.5 --unlabeled-rampup 10 --output "$W/semi" 2>&1 | grep -E "epoch|Teacher"
    nvidia-smi --query-gpu=name,memory.used --format=csv
  } 2>&1 | tee "$OUT/throughput.log" ;;
*)
  echo "gpu_session.sh: unknown verb '$verb' (prepare, checks or throughput)" >&2; exit 2 ;;
esac
