#!/usr/bin/env bash
# Start a private one-node Slurm (munged, slurmctld, slurmd) on localhost, without systemd, for tests.
# Prints on stdout the path of an env file (SLURM_CONF, the sacct shim's bin dir, pids, the private dir);
# everything else goes to stderr. Stop it with: bash slurm/local/down.sh ENVFILE
# Idempotent: installs Debian packages only when missing, and when $STROKE_TSS_SLURM_ENV names a cluster
# that is still up, prints that env file again instead of starting a second one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
exec 3>&1 1>&2  # stdout is only for the env file path

fail() { echo "up.sh: $*" >&2; exit 1; }

cluster_up() {  # cluster_up ENVFILE: all its daemons alive and the node answers
    ( read_env "$1" 2>/dev/null || exit 1
      for pid in $STROKE_TSS_SLURM_PIDS; do alive "$pid" || exit 1; done
      sinfo -h -o %t >/dev/null 2>&1 )
}

if [ -n "${STROKE_TSS_SLURM_ENV:-}" ] && cluster_up "$STROKE_TSS_SLURM_ENV"; then
    echo "up.sh: reusing the cluster of $STROKE_TSS_SLURM_ENV"
    echo "$STROKE_TSS_SLURM_ENV" >&3
    exit 0
fi

need=(slurmctld slurmd sbatch sinfo squeue scancel srun munged)
missing=0
for b in "${need[@]}"; do command -v "$b" >/dev/null || PATH=$PATH:/usr/sbin command -v "$b" >/dev/null || missing=1; done
export PATH=$PATH:/usr/sbin
if [ $missing = 1 ]; then
    [ "$(id -u)" = 0 ] || fail "Slurm is not installed and we are not root (run as root, or apt-get install slurmctld slurmd slurm-client munge)"
    command -v apt-get >/dev/null || fail "Slurm is not installed and there is no apt-get (install slurmctld slurmd slurm-client munge)"
    echo "up.sh: installing slurmctld slurmd slurm-client munge"
    # Keep the packages' own services from starting (no systemd here; we start our own daemons).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    rc=0
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge; } >&2 || rc=$?
    [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $rc = 0 ] || fail "apt-get install slurmctld slurmd slurm-client munge failed (exit $rc)"
fi
[ "$(id -u)" = 0 ] || fail "not root: slurmd must run as root to start jobs (run the tests as root)"

free_port() {  # a TCP port nobody listens on, so several clusters can share the host
    local p hex
    while :; do
        # Above Linux's ephemeral range (32768-60999) and hpc.env's job-id ports (20000-39999).
        p=$((61000 + RANDOM % 4000))
        hex=$(printf ':%04X ' "$p")
        grep -qi "$hex" /proc/net/tcp /proc/net/tcp6 2>/dev/null || { echo "$p"; return; }
    done
}

# munged refuses 0700 directories it cannot traverse as a group check; 0711 works.
DIR=$(mktemp -d /tmp/stroke-tss-slurm.XXXXXX)
chmod 711 "$DIR"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/bin"
ln -s "$HERE/sacct" "$DIR/bin/sacct"
PIDS=""
abort() {  # stop what we started, show the daemons' last words, and end with the reason (last line)
    trap - ERR
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    for f in munged.log slurmctld.log slurmd.log munged.out slurmctld.out slurmd.out; do
        [ -s "$DIR/$f" ] && { echo "--- $DIR/$f"; tail -n 5 "$DIR/$f"; }
    done
    rm -rf "$DIR"
    fail "$1"
}
trap 'abort "unexpected failure at up.sh line $LINENO"' ERR

ctld_port=$(free_port)
slurmd_port=$(free_port)
[ "$slurmd_port" != "$ctld_port" ] || slurmd_port=$((ctld_port + 1))
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
cpus=${STROKE_TSS_SLURM_CPUS:-8}
# Job ids start at a random thousand: hpc.env derives MASTER_PORT from the job id, and two clusters on one
# host (two test runs at once) would otherwise both run job 1 on the same port.
first_job_id=$((1000 * (1 + RANDOM % 19)))
sed -e "s|@FIRST_JOB_ID@|$first_job_id|" -e "s|@DIR@|$DIR|g" -e "s|@CTLD_PORT@|$ctld_port|" -e "s|@SLURMD_PORT@|$slurmd_port|" \
    -e "s|@CPUS@|$cpus|" -e "s|@MEM_MB@|$mem_mb|" "$HERE/slurm.conf.in" > "$DIR/slurm.conf"
export SLURM_CONF=$DIR/slurm.conf

dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge.key"

# Foreground daemons under setsid: $! is the daemon's own pid, and no daemon holds our stdout.
start() {  # start NAME CMD...
    local name=$1; shift
    setsid "$@" </dev/null >>"$DIR/$name.out" 2>&1 3>&- &
    PIDS="$PIDS $!"
}
start munged munged -F --socket="$DIR/munge.socket" --key-file="$DIR/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"
for _ in $(seq 100); do [ -S "$DIR/munge.socket" ] && break; sleep 0.1; done
[ -S "$DIR/munge.socket" ] || abort "munged did not create its socket within 10 s"
start slurmctld slurmctld -D -f "$DIR/slurm.conf"
start slurmd slurmd -D -N localhost -f "$DIR/slurm.conf"

state=""
for _ in $(seq 300); do
    state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    for pid in $PIDS; do alive "$pid" || abort "a daemon (pid $pid) exited during start-up"; done
    sleep 0.1
done
[ "$state" = idle ] || abort "node not idle after 30 s (sinfo state '$state')"
trap - ERR

cat > "$DIR/env" <<ENV
SLURM_CONF=$DIR/slurm.conf
STROKE_TSS_SLURM_DIR=$DIR
STROKE_TSS_SLURM_BIN=$DIR/bin
STROKE_TSS_SLURM_PIDS="${PIDS# }"
ENV
echo "up.sh: Slurm up in $DIR (ports $ctld_port/$slurmd_port, pids${PIDS})"
echo "$DIR/env" >&3
