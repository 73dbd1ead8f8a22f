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
