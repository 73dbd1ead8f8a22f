#!/usr/bin/env bash
# Lose or bring back one node of a multi-node cluster started by `up.sh --nodes N`:
#   bash slurm/local/node.sh ENVFILE kill NODE    SIGKILL every process of NODE's namespace (slurmd, its
#                                                 slurmstepds, the job's ranks): a node that died
#   bash slurm/local/node.sh ENVFILE start NODE   start NODE's slurmd again (it rejoins; ReturnToService=2)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
[ $# = 3 ] || { echo "usage: node.sh ENVFILE kill|start NODE" >&2; exit 2; }
read_env "$1"
what=$2 node=$3
[ -n "${STROKE_TSS_SLURM_NET_INDEX:-}" ] || { echo "node.sh: $1 is a one-node cluster; start one with up.sh --nodes 2" >&2; exit 1; }
ns="sttss$STROKE_TSS_SLURM_NET_INDEX-$node"
case " $STROKE_TSS_SLURM_NETNS " in
    *" $ns "*) ;;
    *) echo "node.sh: no node $node in this cluster (nodes: $STROKE_TSS_SLURM_NODES)" >&2; exit 1 ;;
esac
case "$what" in
    kill) kill_netns "$ns" ;;
    start)
        [ -z "$(ip netns pids "$ns")" ] || { echo "node.sh: $node still has processes; kill it first" >&2; exit 1; }
        pid=$(start_node "$STROKE_TSS_SLURM_DIR" "$node" "$ns")
        echo "node.sh: started slurmd of $node (pid $pid)" >&2 ;;
    *) echo "usage: node.sh ENVFILE kill|start NODE" >&2; exit 2 ;;
esac
