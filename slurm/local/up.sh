#!/usr/bin/env bash
# Start a private Slurm (munged, slurmctld, one slurmd per node) without systemd, for tests.
#   bash slurm/local/up.sh [--nodes N]
# N = 1 (default): one node, `localhost`, on the loopback. N >= 2: nodes node1..nodeN, each slurmd in its own
# network, UTS and mount namespace, joined to slurmctld by a veth pair on a bridge of a private subnet
# (10.213.77.0/24 on sttss-br0 for the first such cluster; see lib.sh): multi-node jobs for real on one machine.
# Prints on stdout the path of an env file (SLURM_CONF, the sacct shim's bin dir, pids, the private dir, the
# nodes); everything else goes to stderr. Stop it with: bash slurm/local/down.sh ENVFILE
# Idempotent: installs Debian packages only when missing, and when $STROKE_TSS_SLURM_ENV names a cluster of
# N nodes that is still up, prints that env file again instead of starting a second one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
exec 3>&1 1>&2  # stdout is only for the env file path

fail() { echo "up.sh: $*" >&2; exit 1; }

NODES=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES=${2:-}; shift ;;
        --nodes=*) NODES=${1#*=} ;;
        *) fail "unknown argument $1 (usage: up.sh [--nodes N])" ;;
    esac
    shift
done
case "$NODES" in ''|*[!0-9]*|0) fail "--nodes takes a whole number >= 1, got '$NODES'" ;; esac
[ "$NODES" -le 9 ] || fail "--nodes $NODES: at most 9 nodes (this machine has $(nproc) cores to share)"

cluster_up() {  # cluster_up ENVFILE: all its daemons alive, the node count right, and every node answers
    ( read_env "$1" 2>/dev/null || exit 1
      for pid in $STROKE_TSS_SLURM_PIDS; do alive "$pid" || exit 1; done
      [ "$(echo ${STROKE_TSS_SLURM_NODES:-localhost} | wc -w)" = "$NODES" ] || exit 1
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
if [ "$NODES" -gt 1 ]; then
    for b in ip nsenter unshare mount; do command -v "$b" >/dev/null || fail "--nodes $NODES needs '$b' (iproute2, util-linux)"; done
fi

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
K=""            # index of this cluster's bridge and subnet (multi-node only)
NETNS=""        # its network namespaces, node order
abort() {  # stop what we started, undo the network, show the daemons' last words, end with the reason
    trap - ERR
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    [ -n "$K" ] && net_down "$K" $NETNS
    for f in "$DIR"/*.log "$DIR"/*.out; do
        [ -s "$f" ] && { echo "--- $f"; tail -n 5 "$f"; }
    done
    rm -rf "$DIR"
    fail "$1"
}
trap 'abort "unexpected failure at up.sh line $LINENO"' ERR

if [ "$NODES" = 1 ]; then
    names=(localhost)
    addrs=(127.0.0.1)
    ctld_host=localhost
else
    # Claim the first free bridge name: `ip link add` fails when it exists, so two clusters never share one.
    for k in 0 1 2 3 4 5 6 7 8 9; do
        ip -4 addr show | grep -q "inet $(net_prefix $k)\." && continue   # subnet taken on this host
        if ip link add "sttss-br$k" type bridge 2>/dev/null; then K=$k; break; fi
    done
    [ -n "$K" ] || abort "no free bridge sttss-br0..9 / subnet 10.213.77-86.0/24 for a multi-node cluster"
    net=$(net_prefix "$K")
    ctld_host="localhost($net.1)"
    ip addr add "$net.1/24" dev "sttss-br$K"
    ip link set "sttss-br$K" up
    names=(); addrs=()
    for i in $(seq "$NODES"); do names+=("node$i"); addrs+=("$net.$((10 + i))"); done
    # The nodes' /etc/hosts (start_node binds it there): node names resolve, as on a cluster.
    { printf '127.0.0.1 localhost\n%s controller\n' "$net.1"
      for i in "${!names[@]}"; do echo "${addrs[i]} ${names[i]}"; done; } > "$DIR/hosts"
    echo "nameserver 127.0.0.1" > "$DIR/resolv.conf"
    for i in "${!names[@]}"; do
        ns="sttss$K-${names[i]}"
        NETNS="$NETNS $ns"
        ip netns add "$ns"
        ip link add "sttss$K-v$((i + 1))" type veth peer name eth0 netns "$ns"
        ip link set "sttss$K-v$((i + 1))" master "sttss-br$K" up
        ip -n "$ns" addr add "${addrs[i]}/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
    NETNS=${NETNS# }
fi

ctld_port=$(free_port)
slurmd_port=$(free_port)
[ "$slurmd_port" != "$ctld_port" ] || slurmd_port=$((ctld_port + 1))
mem_mb=$(awk -v n="$NODES" '/MemTotal/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)
# Honest CPU counts: the nodes share this machine's cores, so N nodes get nproc/N each (at least 1).
cpus=${STROKE_TSS_SLURM_CPUS:-$(( $(nproc) / NODES > 0 ? $(nproc) / NODES : 1 ))}
# Job ids start at a random thousand: hpc.env derives MASTER_PORT from the job id, and two clusters on one
# host (two test runs at once) would otherwise both run job 1 on the same port.
first_job_id=$((1000 * (1 + RANDOM % 19)))
sed -e "s|@FIRST_JOB_ID@|$first_job_id|" -e "s|@DIR@|$DIR|g" -e "s|@CTLD_PORT@|$ctld_port|" \
    -e "s|@SLURMD_PORT@|$slurmd_port|" -e "s|@CTLD_HOST@|$ctld_host|" "$HERE/slurm.conf.in" > "$DIR/slurm.conf"
for i in "${!names[@]}"; do
    echo "NodeName=${names[i]} NodeAddr=${addrs[i]} CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >> "$DIR/slurm.conf"
done
node_list=$(IFS=,; echo "${names[*]}")
echo "PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP" >> "$DIR/slurm.conf"
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
if [ "$NODES" = 1 ]; then
    start slurmd slurmd -D -N localhost -f "$DIR/slurm.conf"
else
    set -- $NETNS
    for name in "${names[@]}"; do
        PIDS="$PIDS $(start_node "$DIR" "$name" "$1")"
        shift
    done
fi

state=""
for _ in $(seq 300); do
    state=$(sinfo -h -o %t 2>/dev/null | sort -u | xargs || true)
    [ "$state" = idle ] && [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" = "$NODES" ] && break
    for pid in $PIDS; do alive "$pid" || abort "a daemon (pid $pid) exited during start-up"; done
    sleep 0.1
done
[ "$state" = idle ] || abort "nodes not idle after 30 s (sinfo states '$state')"
trap - ERR

cat > "$DIR/env" <<ENV
SLURM_CONF=$DIR/slurm.conf
STROKE_TSS_SLURM_DIR=$DIR
STROKE_TSS_SLURM_BIN=$DIR/bin
STROKE_TSS_SLURM_PIDS="${PIDS# }"
STROKE_TSS_SLURM_NODES="${names[*]}"
STROKE_TSS_SLURM_NETNS="$NETNS"
STROKE_TSS_SLURM_NET_INDEX=$K
STROKE_TSS_SLURM_NODE_TMP=$([ "$NODES" = 1 ] && echo "" || echo "$DIR/node-tmp")
ENV
echo "up.sh: Slurm up in $DIR: ${NODES} node(s) ${names[*]}, $cpus CPUs each (ports $ctld_port/$slurmd_port, pids${PIDS})"
echo "$DIR/env" >&3
