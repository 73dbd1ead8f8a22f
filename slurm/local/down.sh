#!/usr/bin/env bash
# Stop a cluster started by up.sh: cancel its jobs (else their slurmstepd outlive slurmd), stop exactly the
# daemons it started (by pid), remove what it made for several nodes (their namespaces and every process in
# them, veths, bridge) and its private directory.   Usage: bash slurm/local/down.sh ENVFILE
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
[ $# = 1 ] || { echo "usage: down.sh ENVFILE (the path up.sh printed)" >&2; exit 2; }
read_env "$1"
case "$STROKE_TSS_SLURM_DIR" in
    /tmp/stroke-tss-slurm.*) ;;
    *) echo "down.sh: $1 names $STROKE_TSS_SLURM_DIR, not a directory made by up.sh; nothing done" >&2; exit 1 ;;
esac

if sinfo -h >/dev/null 2>&1; then
    scancel --partition=debug 2>/dev/null || true
    for _ in $(seq 100); do  # wait until no job step is left running
        [ -z "$(squeue -h -t RUNNING,COMPLETING,CONFIGURING,SUSPENDED -o %i 2>/dev/null)" ] && break
        sleep 0.1
    done
fi

# Reverse start order: slurmd, slurmctld, then munged (the others talk to it while stopping).
pids=($STROKE_TSS_SLURM_PIDS)
for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    alive "$pid" || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
        echo "down.sh: pid $pid ignored SIGTERM for 10 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
done
if [ -n "${STROKE_TSS_SLURM_NET_INDEX:-}" ]; then
    # A node restarted by node.sh has a pid up.sh never knew: its namespace holds it, and net_down kills it.
    net_down "$STROKE_TSS_SLURM_NET_INDEX" $STROKE_TSS_SLURM_NETNS
fi
rm -rf "$STROKE_TSS_SLURM_DIR"
echo "down.sh: stopped ${STROKE_TSS_SLURM_PIDS} and removed $STROKE_TSS_SLURM_DIR" >&2
