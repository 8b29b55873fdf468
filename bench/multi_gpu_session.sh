#!/usr/bin/env bash
# One multi-GPU session in one command (one host, G GPUs, NCCL): what a single GPU cannot show.
#
#   1. the training entrypoint under torchrun, FSDP2 over NCCL: a run preempted (SIGUSR1 at a
#      random step, every rank) and resumed equals an uninterrupted run, bit for bit (per-step
#      metrics and the final checkpoint's tensors);
#   2. a run stopped on G GPUs (only the last rank signalled: the stop is agreed through the
#      all-reduce), resumed on 2 (when G > 2) and then on 1 GPU: every global sample consumed
#      exactly once, losses before the stop identical, the loss difference after it reported;
#   3. bench/dist_bench.py: async pinned saves of an FSDP2 GPT while training runs its NCCL
#      collectives (blocked/staged/durable per rank, throughput with vs without saves, and the
#      last checkpoint loaded into a fresh model and compared bit for bit);
#   4. logs and metrics worth keeping copied to $OUT.
#
#   OUT=/some/dir TOTAL_S=560 bash bench/multi_gpu_session.sh
#   KF_SESSION_DEVICE=cpu OUT=/tmp/x bash bench/multi_gpu_session.sh   # gloo/CPU, tiny sizes
#
# Every stage is time-boxed, a failing stage does not stop the next, and each prints a line
# starting with VERDICT; the summary at the end repeats them. Optional wheels for packages the
# machine lacks can sit in .whl/ (installed into /tmp/site). Environment knobs: G (GPU count,
# default: all), STEPS (30), DIST_SIZE (gpt-1b), PY (python3), TOTAL_S (560).
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYTHONWARNINGS=ignore
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# distributed.deterministic=true sets this itself (setdefault, before the first cuBLAS call);
# exporting it here as well makes the requirement visible and covers every worker.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-560}
PY=${PY:-python3}
DEV=${KF_SESSION_DEVICE:-cuda}
STEPS=${STEPS:-30}
T0=$(date +%s)
left() { echo $((TOTAL_S - ($(date +%s) - T0))); }
# box WANT RESERVE: seconds for the next command, at most WANT, keeping RESERVE for later stages
box() { local b=$(( $(left) - $2 )); [ "$b" -gt "$1" ] && b=$1; [ "$b" -lt 1 ] && b=1; echo $b; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WORK=$(mktemp -d -t kempnerforge-mgpu-session-XXXX)
exec > >(tee -a "$OUT/session.log") 2>&1

# -- packages -------------------------------------------------------------------------------
source "$REPO/bench/session_packages.sh"

# -- device, GPU count, config ----------------------------------------------------------------
if [ "$DEV" = cpu ]; then
  G=${G:-2}
  BACKEND=gloo
  # A tiny model so the whole script runs in a couple of minutes on a laptop-sized CPU.
  EXTRA=(model.n_layer=2 model.d_model=64 model.n_head=2 model.seq_len=32 model.vocab_size=512
         train.global_batch_size=8 data.synthetic_tokens=40000 distributed.intra_op_threads=1)
  GBS=8
  DIST_ARGS=(--device cpu --backend gloo --size "${DIST_SIZE:-tiny-1m}" --batch 2 --seq 32
             --steps 20 --interval 5 --threads 1)
else
  G=${G:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
  [ "${G:-0}" -ge 1 ] || G=$($PY -c "import torch; print(torch.cuda.device_count())")
  BACKEND=nccl
  EXTRA=(model.compute_dtype=bfloat16)
  GBS=32  # configs/small.yaml; divisible by 1, 2, 4 and 8 ranks
  # --steps is a ceiling: dist_bench trims it to the time it is given (and says so)
  DIST_ARGS=(--device cuda --backend nccl --size "${DIST_SIZE:-gpt-1b}" --steps 200 --interval 50)
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m > "$OUT/gpu-topology.txt" 2>&1  # NVLink or PCIe: explains NCCL figures
fi
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cuda', torch.cuda.is_available(), 'gpus', torch.cuda.device_count())"
echo "session: device=$DEV G=$G backend=$BACKEND steps=$STEPS total=${TOTAL_S}s out=$OUT work=$WORK"
echo "env: CUBLAS_WORKSPACE_CONFIG=$CUBLAS_WORKSPACE_CONFIG NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE OMP_NUM_THREADS=$OMP_NUM_THREADS"

COMMON=(--config configs/small.yaml distributed.backend=$BACKEND distributed.device=$DEV
        distributed.deterministic=true distributed.parallel=fsdp train.max_steps=$STEPS
        train.log_interval=10 checkpoint.interval=10 checkpoint.async_mode=async_with_pinned_mem
        data.log_samples=true "${EXTRA[@]}")
# trun NPROC SECONDS overrides...: the training entrypoint under torchrun, time-boxed
trun() {
  local n=$1 t=$2
  shift 2
  [ "$t" -lt 20 ] && return 125  # not enough time left to be worth starting
  timeout -k 10 "$t" $PY -m torch.distributed.run --standalone --nproc_per_node="$n" \
    -m kempnerforge.train "${COMMON[@]}" "$@"
}
# how RC: torchrun's exit status in words
how() { case $1 in 124|137) echo "TIMED OUT ($1)";; 125) echo "SKIPPED (no time left)";; *) echo "exit $1";; esac; }
# workers75 LOG: did torchrun report a worker exit code 75 (the preemption exit)?
workers75() { grep -qE "exitcode\s*:\s*75" "$1" && echo "workers exit 75" || echo "NO worker exit 75"; }
# errs LOG...: the first exception lines the workers printed, if any
errs() {
  local f
  for f in "$@"; do
    [ -f "$f" ] || continue
    local e
    e=$(grep -E "^(\[rank[0-9]+\]: )?[A-Za-z_.]*(Error|Exception)\b|terminate called" "$f" \
        | grep -v ChildFailedError | head -n 5 | cut -c1-300)
    [ -n "$e" ] && printf -- "--- errors in %s\n%s\n" "$(basename "$f")" "$e"
  done
}
# ended LOG: what the run itself said at its end (torchrun's exit code alone can mislead:
# a worker that aborts at interpreter exit after "done" fails the launch)
ended() {
  local d a
  d=$(grep -ohE "done: [0-9]+ steps|kempnerforge stop: reason=[a-z-]+ signal=[A-Z0-9-]+ step=[0-9]+" "$1" | tail -n 1)
  a=$(grep -c "terminate called without an active exception" "$1")
  echo "[${d:-no end line}${a:+$( [ "$a" -gt 0 ] && echo "; $a worker(s) aborted at exit")}]"
}

# Reserve for what follows each stage (stage 3 needs ~150 s on 2 H100s at gpt-1b).
if [ "$DEV" = cpu ]; then R3=70; else R3=200; fi
R2=$((R3 + 60))

# -- 1. FSDP2 + NCCL: preempted + resumed == uninterrupted, bit for bit ------------------------
echo "=== 1. bit-exact preemption/resume, FSDP2 on $G ranks (left $(left)s)"
K=$((1 + RANDOM % (STEPS - 3)))
trun $G "$(box 120 $((R2 + 120)))" output_dir=$WORK/a > $WORK/a.log 2>&1
echo "A uninterrupted: torchrun $(how $?) $(ended $WORK/a.log)"
trun $G "$(box 120 $((R2 + 80)))" output_dir=$WORK/b resilience.debug_signal_step=$K \
  resilience.debug_signal_rank=-1 > $WORK/b1.log 2>&1
echo "B preempted by SIGUSR1 on every rank after step $K: torchrun $(how $?), $(workers75 $WORK/b1.log) $(ended $WORK/b1.log)"
grep -h "kempnerforge stop\|durable=" $WORK/b1.log | tail -n 2
trun $G "$(box 120 $((R2 + 30)))" output_dir=$WORK/b > $WORK/b2.log 2>&1
echo "B resumed: torchrun $(how $?) $(ended $WORK/b2.log)"
grep -h "resumed from step" $WORK/b2.log | tail -n 1
timeout -k 5 "$(box 90 $R2)" $PY - "$WORK/a" "$WORK/b" "$STEPS" "$BACKEND" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests/distributed")
import torch
import train_harness as h

a, b, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
tag = f"VERDICT stage 1 (FSDP2 {sys.argv[4]} preempt/resume)"
try:
    ma = {m["step"]: m for m in h.dedup_metrics(a)}
    mb = {m["step"]: m for m in h.dedup_metrics(b)}
    bad = [s for s in range(1, n + 1) if s not in ma or ma.get(s) != mb.get(s)]
    print(f"metrics: A {len(ma)} steps, B {len(mb)} steps; final loss "
          f"{ma.get(n, {}).get('loss')!r} / {mb.get(n, {}).get('loss')!r}")
    for d in (a, b):
        if not (d / "checkpoints" / f"step_{n}" / ".metadata").is_file():
            raise FileNotFoundError(f"no final checkpoint step_{n} in {d.name}")
    ta, tb = h.checkpoint_tensors(a, n), h.checkpoint_tensors(b, n)
    differ = sorted(k for k in set(ta) | set(tb) if k not in ta or k not in tb or (
        not torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor) else ta[k] != tb[k]))
    nt = sum(isinstance(v, torch.Tensor) for v in ta.values())
    print(f"final checkpoint step_{n}: {nt} tensors compared, {len(differ)} differ {differ[:5]}")
    ok = not bad and not differ and nt > 0
    print(f"{tag}: " + (
        "bit-exact" if ok else f"MISMATCH at steps {bad[:20]}, tensors {differ[:5]}"))
except BaseException as e:  # a missing run or checkpoint (DCP raises BaseException): say so
    print(f"{tag}: FAILED to compare ({type(e).__name__}: {e})")
EOF
[ $? -ne 0 ] && echo "VERDICT stage 1 (FSDP2 $BACKEND preempt/resume): FAILED (comparison did not finish)"
errs $WORK/a.log $WORK/b1.log $WORK/b2.log

# -- 2. stop on G ranks, resume on fewer: each sample once -------------------------------------
echo "=== 2. resume on a different GPU count (left $(left)s)"
K2=$((3 + RANDOM % (STEPS / 2 - 3)))
K3=$((K2 + 2 + RANDOM % (STEPS - K2 - 4)))
CHAIN="$G"
trun $G "$(box 120 $((R3 + 60)))" output_dir=$WORK/c resilience.debug_signal_step=$K2 \
  resilience.debug_signal_rank=$((G - 1)) > $WORK/c1.log 2>&1
echo "C on $G ranks, SIGUSR1 to rank $((G - 1)) only after step $K2: torchrun $(how $?), $(workers75 $WORK/c1.log) $(ended $WORK/c1.log)"
if [ "$G" -gt 2 ]; then
  CHAIN="$CHAIN,2"
  trun 2 "$(box 100 $((R3 + 40)))" output_dir=$WORK/c resilience.debug_signal_step=$K3 \
    resilience.debug_signal_rank=1 > $WORK/c2.log 2>&1
  echo "C resumed on 2 ranks, SIGUSR1 to rank 1 after step $K3: torchrun $(how $?), $(workers75 $WORK/c2.log) $(ended $WORK/c2.log)"
else
  K3=0
fi
CHAIN="$CHAIN,1"
trun 1 "$(box 100 $((R3 + 15)))" output_dir=$WORK/c > $WORK/c3.log 2>&1
echo "C resumed on 1 rank to the end: torchrun $(how $?) $(ended $WORK/c3.log)"
grep -h "saved with .* ranks, loading with" $WORK/c3.log | head -n 1 | cut -c1-200
timeout -k 5 "$(box 60 $R3)" $PY - "$WORK/a" "$WORK/c" "$STEPS" "$GBS" "$K2" "$K3" "$CHAIN" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests/distributed")
import train_harness as h

a, c = Path(sys.argv[1]), Path(sys.argv[2])
n, gbs, k2, k3, chain = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
tag = f"VERDICT stage 2 (stop on {chain.replace(',', ' -> ')} ranks)"
try:
    ma = {m["step"]: m for m in h.dedup_metrics(a)}
    mc = {m["step"]: m for m in h.dedup_metrics(c)}
    problems = []
    if sorted(mc) != list(range(1, n + 1)):
        problems.append(f"steps logged {sorted(mc)[:3]}..{sorted(mc)[-3:]} (want 1..{n})")
    same = [s for s in range(1, k2 + 1) if ma.get(s) != mc.get(s)]
    if same:
        problems.append(f"steps before the stop differ from run A: {same[:10]}")
    numbers, indices = h.consumed_samples(c)
    base_numbers, base_indices = h.consumed_samples(a)
    want = list(range(n * gbs))
    if numbers != want:
        dup = len(numbers) - len(set(numbers))
        problems.append(f"global samples: {len(numbers)} consumed, {dup} repeated, "
                        f"{len(set(want) - set(numbers))} missing")
    if base_numbers != want:
        problems.append("run A itself did not consume each sample once")
    if indices != base_indices:
        problems.append("dataset indices differ from run A")
    diffs = [(s, abs(mc[s]["loss"] - ma[s]["loss"])) for s in range(k2 + 1, n + 1)
             if s in mc and s in ma]
    worst = max(diffs, key=lambda x: x[1]) if diffs else (None, None)
    print(f"samples: {len(numbers)} consumed (want {len(want)}), steps 1..{k2} identical to A: "
          f"{not same}; after the stop (world size changed, not expected bit-exact): "
          f"max |loss - A| {worst[1]!r} at step {worst[0]}, final {mc.get(n, {}).get('loss')!r} "
          f"vs A {ma.get(n, {}).get('loss')!r}")
    print(f"{tag}: " + ("each sample exactly once, pre-stop losses bit-exact" if not problems
                        else "PROBLEM: " + "; ".join(problems)))
except BaseException as e:
    print(f"{tag}: FAILED to check ({type(e).__name__}: {e})")
EOF
[ $? -ne 0 ] && echo "VERDICT stage 2 (resume on another GPU count): FAILED (check did not finish)"
errs $WORK/c1.log $WORK/c2.log $WORK/c3.log

# -- 3. async pinned saves beside NCCL collectives, FSDP2 at scale ------------------------------
B3=$(box 600 15)
echo "=== 3. dist bench on $G ranks: ${DIST_ARGS[*]} (box ${B3}s, left $(left)s)"
if [ "$B3" -ge 60 ]; then
  timeout -k 15 "$B3" $PY -m torch.distributed.run --standalone --nproc_per_node=$G \
    bench/dist_bench.py "${DIST_ARGS[@]}" --dir $WORK --out $OUT/dist-bench.json \
    --time-budget-s $((B3 - 25)) > $WORK/dist.log 2>&1
  rc=$?
  echo "dist bench: torchrun exit $rc"
  if grep -q "^VERDICT" $WORK/dist.log; then
    sed -n '/^dist bench:/,/^VERDICT/p' $WORK/dist.log | sed 's/^VERDICT/VERDICT stage 3 (dist bench)/'
  else
    grep -v "^\s*$" $WORK/dist.log | grep -v "INFO" | tail -n 25
    echo "VERDICT stage 3 (dist bench): FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time box hit: deadlock or too slow'))"
  fi
else
  echo "VERDICT stage 3 (dist bench): SKIPPED (${B3}s left)"
fi

# -- 4. keep the small files --------------------------------------------------------------------
mkdir -p "$OUT/logs"
for d in a b c; do
  [ -f $WORK/$d/metrics.jsonl ] && cp $WORK/$d/metrics.jsonl "$OUT/metrics-$d.jsonl"
done
for f in $WORK/*.log; do tail -c 300000 "$f" > "$OUT/logs/$(basename "$f")"; done
rm -rf "$WORK"
echo "=== summary (${G} ranks, $DEV, $(( $(date +%s) - T0 ))s)"
sleep 1  # let tee catch up; read first, print after (never grep a file while appending to it)
verdicts=$(grep -h "^VERDICT" "$OUT/session.log")
echo "$verdicts"
ls "$OUT"
