#!/usr/bin/env bash
# Stop the one-host SLURM cluster started by start.sh, by its pid files (never by process name,
# so other SLURM daemons on the machine are left alone).
#
# Usage: slurm/dev-cluster/stop.sh [--wipe]
#   --wipe  also delete the cluster's state (job ids, queue, logs); the next start is fresh.
# State:  $KF_SLURM_DEV_DIR (default: <repo>/.slurm-dev/)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="${KF_SLURM_DEV_DIR:-$REPO/.slurm-dev}"
WIPE=0
[[ "${1:-}" == "--wipe" ]] && WIPE=1

if [[ ! -d "$DIR/run" ]]; then
    echo "[dev-cluster] nothing to stop under $DIR" >&2
    exit 0
fi

# Jobs first, so no step outlives its slurmd.
if [[ -f "$DIR/slurm.conf" ]] && [[ -s "$DIR/run/slurmctld.pid" ]] \
    && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --quiet --full --user=root 2>/dev/null || true
fi

stop_pidfile() {
    local f="$1" pid
    [[ -s "$f" ]] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

for f in "$DIR"/run/slurmd-*.pid; do stop_pidfile "$f"; done
stop_pidfile "$DIR/run/slurmctld.pid"
stop_pidfile "$DIR/run/munged.pid"
echo "[dev-cluster] stopped" >&2

if [[ $WIPE == 1 ]]; then
    rm -rf "$DIR"
    echo "[dev-cluster] wiped $DIR" >&2
fi
