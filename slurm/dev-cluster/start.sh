#!/usr/bin/env bash
# Start a one-host SLURM cluster: munged, slurmctld and 10 slurmd "nodes" n1..n10 on loopback:
# n1..n4 (partition debug, the default) share their CPUs among many jobs; n5..n10 (partition
# isolated) are for jobs that need their nodes to themselves (a node set DOWN, a preemption).
#
# Why: the launcher, the sbatch templates and the self-requeue are tested against a real SLURM,
# not a mock. This script makes one on a bare Debian/Ubuntu machine (root, apt) in seconds.
#
# Usage:   slurm/dev-cluster/start.sh          # then run the printed `export SLURM_CONF=...`
#          eval "$(slurm/dev-cluster/start.sh --quiet)"   # same, exported in this shell
# State:   $KF_SLURM_DEV_DIR (default: <repo>/.slurm-dev/): conf, munge key, logs, pid files.
# Stop:    slurm/dev-cluster/stop.sh [--wipe]
# Env:     KF_SLURM_DEV_CPUS (CPUs each of n1..n4 advertises, default 8: how many jobs share
#          them; the host's cores are shared by all jobs whatever the count),
#          KF_SLURM_DEV_GPUS (pretend GPUs per node, a count only, default 2),
#          KF_SLURM_DEV_PORT (slurmctld port, default 6817; node i uses PORT+10183+i = 17000+i).
#
# Idempotent: daemons already running (by their pid files) are left alone; missing ones start.
# Node names resolve to 127.0.0.1 only inside the daemons' private mount namespace (a bind-mounted
# hosts file), so MASTER_ADDR=n1 works inside jobs and the host's /etc/hosts is untouched.
set -euo pipefail

QUIET=0
[[ "${1:-}" == "--quiet" ]] && QUIET=1
log() { [[ $QUIET == 1 ]] || echo "[dev-cluster] $*" >&2; }
die() { echo "[dev-cluster] ERROR: $*" >&2; exit 1; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="${KF_SLURM_DEV_DIR:-$REPO/.slurm-dev}"
CPUS="${KF_SLURM_DEV_CPUS:-8}"
GPUS="${KF_SLURM_DEV_GPUS:-2}"   # pretend GPUs per node (a count only)
CTLD_PORT="${KF_SLURM_DEV_PORT:-6817}"
NODES=(n1 n2 n3 n4 n5 n6 n7 n8 n9 n10)
N_SHARED=4                          # n1..n4: partition debug; the rest: partition isolated
NODE_PORT0=$((CTLD_PORT + 10184))   # 17001 for the default port
SHARED_PORTS="${NODE_PORT0}-$((NODE_PORT0 + N_SHARED - 1))"
ISOLATED_PORTS="$((NODE_PORT0 + N_SHARED))-$((NODE_PORT0 + ${#NODES[@]} - 1))"
MEMORY=$((CPUS * 500 > 4000 ? CPUS * 500 : 4000))   # DefMemPerCPU=500 for every CPU
T0=$(date +%s%N)

[[ $(id -u) == 0 ]] || die "must run as root (slurmd runs jobs as root here; apt installs packages)"

# ---------------------------------------------------------------- packages
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
if ((${#need[@]})); then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >&2
fi
command -v unshare >/dev/null || die "unshare (util-linux) is required"

mkdir -p "$DIR"/{state,spool,run,log,munge}
DIR="$(cd "$DIR" && pwd)"
chmod 755 "$DIR" "$DIR/munge"   # munged refuses a socket directory others cannot reach
CONF="$DIR/slurm.conf"
SOCK="$DIR/munge/munge.socket.2"

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------- munge
if ! alive "$DIR/run/munged.pid"; then
    [[ -s "$DIR/munge/munge.key" ]] || mungekey -c -k "$DIR/munge/munge.key" >&2
    chmod 600 "$DIR/munge/munge.key"
    rm -f "$SOCK" "$SOCK.lock"
    log "starting munged"
    munged --key-file="$DIR/munge/munge.key" --socket="$SOCK" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed" --force
fi

# ---------------------------------------------------------------- slurm.conf
sed -e "s|@DIR@|$DIR|g" -e "s|@MUNGE_SOCKET@|$SOCK|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
    -e "s|@SHARED_PORTS@|$SHARED_PORTS|g" -e "s|@ISOLATED_PORTS@|$ISOLATED_PORTS|g" \
    -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY@|$MEMORY|g" -e "s|@GPUS@|$GPUS|g" \
    "$HERE/slurm.conf.in" >"$CONF.new"
# slurmd drops GPUs without device files: empty placeholder files stand in for /dev/nvidiaN.
mkdir -p "$DIR/fake-gpu"
: >"$DIR/gres.conf"
if ((GPUS > 0)); then
    for ((i = 0; i < GPUS; i++)); do : >"$DIR/fake-gpu/nvidia$i"; done
    echo "Name=gpu File=$DIR/fake-gpu/nvidia[0-$((GPUS - 1))]" >"$DIR/gres.conf"
fi
if [[ -f "$CONF" ]] && ! cmp -s "$CONF" "$CONF.new" && alive "$DIR/run/slurmctld.pid"; then
    die "$CONF changed while the cluster runs: run slurm/dev-cluster/stop.sh first"
fi
mv "$CONF.new" "$CONF"
export SLURM_CONF="$CONF"

# ---------------------------------------------------------------- daemons
# A private hosts file in which the node names resolve to loopback, mounted over /etc/hosts only
# in the daemons' own mount namespace; jobs inherit it from slurmd.
HOSTS="$DIR/hosts"
{ grep -v -E "\s(${NODES[*]// /|})(\s|$)" /etc/hosts || true; echo "127.0.0.1 ${NODES[*]}"; } >"$HOSTS"

start=()
alive "$DIR/run/slurmctld.pid" || start+=("slurmctld")
for n in "${NODES[@]}"; do
    alive "$DIR/run/slurmd-$n.pid" || start+=("slurmd -N $n")
done
if ((${#start[@]})); then
    log "starting: ${start[*]}"
    script="mount --bind '$HOSTS' /etc/hosts"
    for cmd in "${start[@]}"; do script+=" && $cmd"; done
    # The daemons fork into the background and keep the namespace alive after unshare returns.
    SLURM_CONF="$CONF" unshare --mount --propagation private bash -c "$script" >&2 \
        || die "daemons failed to start; see $DIR/log/"
fi

# ---------------------------------------------------------------- wait until idle
for _ in $(seq 1 150); do
    states="$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)"
    idle=$(grep -c -E ' (idle|allocated|mixed|completing)' <<<"$states" || true)
    [[ "$idle" -ge ${#NODES[@]} ]] && break
    # A node left DOWN/DRAIN by an earlier unclean stop comes back with this.
    if grep -q -E ' (down|drain|drained|fail)' <<<"$states"; then
        scontrol update nodename="n[1-${#NODES[@]}]" state=resume 2>/dev/null || true
    fi
    sleep 0.1
done
[[ "${idle:-0}" -ge ${#NODES[@]} ]] || die "nodes not idle after 30 s: $(tr '\n' ';' <<<"$states") see $DIR/log/"

ms=$((($(date +%s%N) - T0) / 1000000))
log "up in $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s: $(tr '\n' ' ' <<<"$states")"
echo "export SLURM_CONF=$CONF"
