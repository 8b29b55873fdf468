#!/usr/bin/env bash
# One GPU session: what a handed-over EMA costs the loop at 1B (bench/states_cost.py), then the
# trainer at 1B preempted once under the local launcher and `kempnerforge report` of its run
# ledger (where the time of a preemption went). Everything it keeps goes under $OUT.
#
#   OUT=/some/dir bash bench/gpu_report_session.sh
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
source "$REPO/bench/session_packages.sh"
WORK=$(mktemp -d -t kempnerforge-gpu-report-XXXX)
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"

echo "=== EMA at 1B ($(( $(date +%s) - T0 ))s)"
timeout ${STATES_S:-240} $PY bench/states_cost.py --device cuda --size ${STATES_SIZE:-gpt-1b} \
  --saves ${STATES_SAVES:-6} --dir $WORK --json $OUT/states-cost.json 2>&1 | grep -v "^\s*$" | tail -n 8
rm -rf $WORK/*

echo "=== 1B trainer, one preemption, then the report ($(( $(date +%s) - T0 ))s)"
RUN=$WORK/run
STEPS=${STEPS:-60}
$PY -m kempnerforge.launch --local --config configs/gpu-1b.yaml \
  output_dir=$RUN train.max_steps=$STEPS train.log_interval=10 checkpoint.interval=20 \
  checkpoint.keep_last_n=1 > $OUT/train.log 2>&1 &
LAUNCHER=$!
for _ in $(seq 1 600); do
  n=$(wc -l < $RUN/metrics.jsonl 2>/dev/null || echo 0)
  [ "${n:-0}" -ge ${SIGNAL_AFTER:-25} ] && break
  sleep 0.5
done
kill -USR1 $LAUNCHER
timeout ${TRAIN_S:-300} tail --pid=$LAUNCHER -f /dev/null
wait $LAUNCHER; echo "launcher exit $?"
grep -h "kempnerforge stop\|restart\|resumed from\|saved step" $OUT/train.log | tail -n 8
$PY -m kempnerforge.cli report $RUN/checkpoints | tee $OUT/report.txt
$PY -m kempnerforge.cli report $RUN/checkpoints --json > $OUT/report.json
$PY -m kempnerforge.cli report $RUN/checkpoints --plot $OUT/report.png || true
cp $RUN/checkpoints/events.jsonl $OUT/ 2>/dev/null
rm -rf $WORK
echo "=== done in $(( $(date +%s) - T0 ))s"
