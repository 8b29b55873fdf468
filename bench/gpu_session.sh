#!/usr/bin/env bash
# One GPU session in one command: the GPU-marked checkpoint tests, the flush profile at 1B (our
# writer against DCP's and the disk floor at that size), then the checkpoint benchmark. Everything
# it writes goes under $OUT (default: a temp dir).
#
#   OUT=/some/dir TOTAL_S=540 bash bench/gpu_session.sh
#
# Optional wheels for packages the machine lacks can sit in .whl/ (installed into /tmp/site).
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-$(mktemp -d)}
TOTAL_S=${TOTAL_S:-540}
PY=${PY:-python3}
T0=$(date +%s)
left() { echo $((TOTAL_S - ($(date +%s) - T0))); }
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WORK=$(mktemp -d -t kempnerforge-gpu-session-XXXX)

# -- packages -------------------------------------------------------------------------------
source "$REPO/bench/session_packages.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cuda', torch.cuda.is_available())"

# -- 1. GPU-marked checkpoint tests ---------------------------------------------------------
echo "=== gpu tests (left $(left)s)"
timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu \
  tests/unit/test_checkpoint.py tests/unit/test_checkpoint_perf.py 2>&1 | tail -n 15
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/unit/test_checkpoint_writer.py 2>&1 | tail -n 5

# -- 2. flush profile at 1B: our writer vs DCP's, against the fsync'd-write floor at that size ------
PROFILE_S=${PROFILE_S:-120}
if [ "$PROFILE_S" -gt 0 ]; then
  echo "=== flush profile (left $(left)s)"
  timeout "$PROFILE_S" $PY bench/profile_flush.py --size gpt-1b --saves 1 --variants 2 --floor \
    --dir $WORK --out $OUT/flush-profile.json 2>&1 | grep -v "^\s*$" | tail -n 30
fi

# -- 3. checkpoint benchmark -----------------------------------------------------------------
BUDGET=$(( $(left) - 25 ))
echo "=== checkpoint bench, --time-budget-s $BUDGET (left $(left)s)"
timeout $(( BUDGET + 20 )) $PY bench/checkpoint_bench.py --sizes gpt-1b,gpt-124m,gpt-354m,gpt-757m \
  --skip ${BENCH_SKIP:-baselines} --tp-reps ${TP_REPS:-2} --preempt-size gpt-354m --preempt-interval 40 --dir $WORK --out $OUT/bench-gpu.json --plot $OUT/bench-gpu.png \
  --time-budget-s $BUDGET 2>&1 | grep -v "^\s*$" | tail -n 60
echo "bench exit ${PIPESTATUS[0]}"

rm -rf $WORK
echo "=== done in $(( $(date +%s) - T0 ))s"
