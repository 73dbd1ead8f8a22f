# Helpers shared by up.sh and down.sh (sourced, not run).

# alive PID: true when PID runs and is not a zombie. Stopped daemons linger as zombies in
# containers whose init does not reap, and `kill -0` says yes to a zombie.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    # Field 3 is the state; field 2 (the command) is in parentheses and may hold spaces.
    stat=${stat##*) }
    [ "${stat%% *}" != Z ] && [ "${stat%% *}" != X ]
}

# read_env FILE: sets the variables of an env file written by up.sh in this shell.
read_env() {
    [ -f "$1" ] || { echo "slurm/local: env file $1 does not exist" >&2; return 1; }
    set -a
    # shellcheck disable=SC1090
    . "$1"
    set +a
}

# --- Multi-node clusters (up.sh --nodes N, N >= 2): every node is a slurmd in namespaces of its own ---
# Node I of cluster K: network namespace sttssK-nodeI (address 10.213.(77+K).(10+I) on its eth0, a veth whose
# other end, sttssK-vI, is a port of the bridge sttss-brK in the root namespace, address 10.213.(77+K).1 for
# slurmctld), UTS namespace with hostname nodeI, and a mount namespace in which $DIR/node-tmp is that node's
# own folder ($DIR/nodes/nodeI/tmp): node-local disk, as $TMPDIR is on a real cluster. Nothing else is routed.

net_prefix() { echo "10.213.$((77 + $1))"; }   # net_prefix K: first three octets of cluster K's subnet

# start_node DIR NAME NETNS: start NAME's slurmd in its namespaces (foreground daemon under setsid);
# prints its pid. The daemon holds neither our stdout nor fd 3.
start_node() {
    local dir=$1 name=$2 ns=$3
    mkdir -p "$dir/nodes/$name/tmp" "$dir/node-tmp"
    # nsenter --net: the node's network namespace (not `ip netns exec`, whose fresh /sys lacks the cgroup
    # mount slurmd needs); unshare --uts: its hostname; --mount: $DIR/hosts over /etc/hosts, so node names
    # resolve, $DIR/resolv.conf over /etc/resolv.conf, so a name lookup that misses the hosts file asks
    # the namespace's own loopback (refused at once) and never the host's name server, and its own node-tmp.
    # All of them exec, so $! is slurmd itself.
    setsid nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
        'hostname "$1" && mount --bind "$2/hosts" /etc/hosts && mount --bind "$2/resolv.conf" /etc/resolv.conf &&
         mount --bind "$3" "$4" && exec slurmd -D -N "$1" -f "$2/slurm.conf"' \
        _ "$name" "$dir" "$dir/nodes/$name/tmp" "$dir/node-tmp" \
        </dev/null >>"$dir/slurmd-$name.out" 2>&1 3>&- &
    echo $!
}

# kill_netns NETNS: SIGKILL every process in the network namespace (all of them were started by the
# cluster's slurmd there: the daemon, its slurmstepds and the job's processes).
kill_netns() {
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(ip netns pids "$1" 2>/dev/null || true)" ] && return 0; sleep 0.1; done
    echo "slurm/local: processes of namespace $1 still alive after SIGKILL: $(ip netns pids "$1" | xargs)" >&2
}

# net_down K NETNS...: remove what up.sh made for cluster K (each step tolerates a part never made).
net_down() {
    local k=$1 ns; shift
    for ns in "$@"; do
        kill_netns "$ns"
        ip netns del "$ns" 2>/dev/null || true   # also removes both ends of its veth
    done
    ip link del "sttss-br$k" 2>/dev/null || true
    # The kernel tears links down after `ip` returned: wait, so that "down" means gone.
    for _ in $(seq 100); do
        ip -o link show 2>/dev/null | grep -Eq ": (sttss-br$k|sttss$k-v[0-9]+)[@:]" || return 0
        sleep 0.1
    done
    echo "slurm/local: links of cluster $k still there after 10 s: $(ip -o link show | grep -Eo "sttss-br$k|sttss$k-v[0-9]+" | xargs)" >&2
}
