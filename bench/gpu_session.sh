#!/usr/bin/env bash
# One GPU session in one command: the GPU-marked checkpoint tests, the training entrypoint's
# bit-exact preemption/resume check on CUDA, the checkpoint benchmark, and (time permitting) the
# flush profile. Everything it writes goes under $OUT (default: a temp dir).
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
WORK=$(mktemp -d /tmp/kf-gpu-session-XXXX)

# -- packages -------------------------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  missing=$($PY - <<'EOF'
import importlib.util as u, glob, os
mods = {"xxhash": "xxhash", "PyYAML": "yaml", "pytest": "pytest", "pluggy": "pluggy",
        "iniconfig": "iniconfig", "packaging": "packaging"}
need = [w for w in glob.glob(".whl/*.whl")
        if (m := mods.get(os.path.basename(w).split("-")[0])) and u.find_spec(m) is None]
print(" ".join(need))
EOF
)
  if [ -n "$missing" ]; then
    echo "installing: $missing"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $missing
  fi
fi
export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cuda', torch.cuda.is_available())"

# -- 1. GPU-marked checkpoint tests ---------------------------------------------------------
echo "=== gpu tests (left $(left)s)"
timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu \
  tests/unit/test_checkpoint.py tests/unit/test_checkpoint_perf.py 2>&1 | tail -n 15

# -- 2. training entrypoint: preempted + resumed == uninterrupted, bit for bit ---------------
echo "=== train exactness (left $(left)s)"
STEPS=${STEPS:-30}
SIG=${SIG:-17}
COMMON=(--config configs/small.yaml distributed.backend=nccl distributed.deterministic=true
        distributed.device=cuda train.max_steps=$STEPS checkpoint.interval=10
        checkpoint.async_mode=async_with_pinned_mem model.compute_dtype=bfloat16)
trun() { timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node=1 \
         -m kempnerforge.train "${COMMON[@]}" "$@"; }
trun output_dir=$WORK/a > $WORK/a.log 2>&1; echo "uninterrupted: exit $?"
trun output_dir=$WORK/b resilience.debug_signal_step=$SIG > $WORK/b1.log 2>&1
echo "preempted at step $SIG (SIGUSR1): exit $? (75 expected)"
grep -h "durable after\|stop requested" $WORK/b1.log | tail -n 2
trun output_dir=$WORK/b > $WORK/b2.log 2>&1; echo "resumed: exit $?"
grep -h "resumed from" $WORK/b2.log | tail -n 1
$PY - "$WORK/a" "$WORK/b" <<'EOF'
import json, sys
def losses(d):
    out = {}
    for ln in open(f"{d}/metrics.jsonl"):
        r = json.loads(ln)
        out[r["step"]] = r["loss"]  # a resumed run appends; the last line of a step wins
    return out
a, b = losses(sys.argv[1]), losses(sys.argv[2])
diff = [s for s in sorted(a) if a.get(s) != b.get(s)]
print(f"steps: uninterrupted {len(a)}, preempted+resumed {len(b)}; final loss {a.get(max(a))!r} / {b.get(max(b))!r}")
print("VERDICT: bit-exact" if a and a.keys() == b.keys() and not diff
      else f"VERDICT: MISMATCH at steps {diff[:10]}")
EOF
for f in a.log b1.log b2.log; do echo "--- tail $f"; tail -n 4 $WORK/$f; done
cp $WORK/a/metrics.jsonl $OUT/metrics-uninterrupted.jsonl 2>/dev/null
cp $WORK/b/metrics.jsonl $OUT/metrics-resumed.jsonl 2>/dev/null
rm -rf $WORK/a $WORK/b

# -- 3. checkpoint benchmark -----------------------------------------------------------------
PROFILE_S=${PROFILE_S:-0}  # >0 reserves time for the flush profile
BUDGET=$(( $(left) - PROFILE_S - 25 ))
echo "=== checkpoint bench, --time-budget-s $BUDGET (left $(left)s)"
timeout $(( BUDGET + 20 )) $PY bench/checkpoint_bench.py --sizes gpt-1b,gpt-124m,gpt-354m,gpt-757m \
  --skip baselines,resume --preempt-size gpt-354m --preempt-interval 40 --dir $WORK --out $OUT/bench-gpu.json --plot $OUT/bench-gpu.png \
  --time-budget-s $BUDGET 2>&1 | grep -v "^\s*$" | tail -n 60
echo "bench exit ${PIPESTATUS[0]}"

# -- 4. flush profile: 4 vs 8 writer threads, checksums while writing ------------------------
if [ "$(left)" -gt 60 ]; then
  echo "=== flush profile (left $(left)s)"
  timeout $(( $(left) - 5 )) $PY bench/profile_flush.py --size gpt-1b --saves 1 --variants 2 \
    --dir $WORK --out $OUT/flush-profile.json 2>&1 | tail -n 30
else
  echo "=== flush profile skipped (left $(left)s)"
fi
rm -rf $WORK
echo "=== done in $(( $(date +%s) - T0 ))s"
