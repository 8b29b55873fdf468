#!/usr/bin/env bash
# One GPU session in one command: the GPU-marked checkpoint tests; the training entrypoint on one
# GPU preempted with SIGUSR1 at a random step under the local launcher and compared bit for bit
# with an uninterrupted run; then the benchmark's preemption stage (signal to exit, against the
# budget measured in the same run). Everything it writes goes under $OUT (default: a temp dir).
#
#   OUT=/some/dir bash bench/gpu_exactness_session.sh
#   CFG=configs/debug.yaml BENCH=0 PY=.venv/bin/python bash bench/gpu_exactness_session.sh  # CPU dry run
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
T0=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WORK=$(mktemp -d -t kempnerforge-gpu-exact-XXXX)
source "$REPO/bench/session_packages.sh"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"

echo "=== 1. gpu tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu \
  tests/unit/test_checkpoint.py tests/unit/test_checkpoint_perf.py 2>&1 | tail -n 6

echo "=== 2. entrypoint on one GPU: SIGUSR1 at a random step, restarted by the local launcher"
CFG=${CFG:-configs/small.yaml}
OV="train.max_steps=60 train.log_interval=20 checkpoint.interval=10 checkpoint.async_mode=async_with_pinned_mem ${EXTRA:-}"
timeout 200 $PY -m kempnerforge.launch --local --config $CFG output_dir=$WORK/ref $OV \
  > $OUT/ref.log 2>&1 || { echo "reference failed"; tail -n 30 $OUT/ref.log; }
K=$(( (RANDOM % 40) + 8 ))
$PY -m kempnerforge.launch --local --config $CFG output_dir=$WORK/pre $OV > $OUT/pre.log 2>&1 &
L=$!
for _ in $(seq 1 600); do
  n=$( (wc -l < $WORK/pre/metrics.jsonl) 2>/dev/null || echo 0)
  [ "$n" -ge "$K" ] && break
  sleep 0.1
done
kill -USR1 $L
wait $L; echo "launcher exit $? (signal after step $K)"
grep -h "kempnerforge stop\|restarting\|resumed from step\|done:" $OUT/pre.log | tail -n 5
$PY - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
from kempnerforge.cli import load_full_model_state
w = Path(sys.argv[1])
def rows(p):
    out = {}
    for line in (p / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], []).append(r["loss"])
    return out
a, b = rows(w / "ref"), rows(w / "pre")
bad = [s for s in a if any(v != a[s][0] for v in b.get(s, [None]))]
print(f"steps {len(a)} / {len(b)}, loss mismatches: {bad[:5]}")
ma = load_full_model_state(w / "ref" / "checkpoints" / "step_60")
mb = load_full_model_state(w / "pre" / "checkpoints" / "step_60")
diff = [k for k in ma if not (ma[k] == mb[k]).all()]
print(f"final weights: {len(ma)} tensors, {len(diff)} differ")
print("BIT-EXACT" if not bad and not diff and sorted(a) == sorted(b) else "NOT BIT-EXACT")
PYEOF

[ "${BENCH:-1}" = 0 ] && { rm -rf $WORK; exit 0; }
echo "=== 3. preemption stage of the checkpoint bench (gpt-354m)"
timeout 240 $PY bench/checkpoint_bench.py --sizes gpt-354m --skip baselines,resume,throughput \
  --preempt-size gpt-354m --preempt-interval 40 --dir $WORK --out $OUT/bench-preempt.json \
  --no-size-floor 2>&1 | grep -iE "preempt|signal|exit|budget|error" | tail -n 20
rm -rf $WORK
echo "=== done in $(( $(date +%s) - T0 ))s"
