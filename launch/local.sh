#!/usr/bin/env bash
# N processes of mgjax.train on this machine, joined through a coordinator on localhost (docs/launch.md).
set -euo pipefail
here=${BASH_SOURCE[0]%/*}
[[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
    cat <<EOF
usage: $PROG --processes N [options] [-- MGJAX_TRAIN_ARGS...]

Starts N processes of \`PYTHON -m MODULE MGJAX_TRAIN_ARGS\` on this machine, each with --set
distributed.mode=explicit, distributed.coordinator=localhost:PORT, distributed.num_processes=N and its own
distributed.process_id; process i writes LOG_DIR/process_<i>.log. When one fails, the others are stopped (SIGTERM,
then SIGKILL after the grace period) and the exit status is the failed process's.

options:
  --processes N            number of processes (required)
  --devices-per-process D  run on the CPU with D devices per process (JAX_PLATFORMS=cpu,
                           XLA_FLAGS=--xla_force_host_platform_device_count=D)
  --gpus-per-process G     give process i the GPUs i*G .. i*G+G-1 (distributed.local_device_ids)
  --port P                 coordinator port (default 12355)
  --log-dir DIR            where the logs go (default runs/launch_logs)
  --grace S                seconds a stopped process gets to exit before SIGKILL (default 30)
  --python PY              interpreter (default python3)
  --module MOD             module to run (default mgjax.train)
  --dry-run                print the commands, one per line, and run nothing
  -h, --help               show this help
EOF
}

processes='' devices='' gpus='' port=12355 log_dir=runs/launch_logs grace=30 python=python3 module=mgjax.train
dry_run=0
while (($#)); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"
    case $1 in
        --processes) need_value "$@"; processes=$2; shift 2 ;;
        --devices-per-process) need_value "$@"; devices=$2; shift 2 ;;
        --gpus-per-process) need_value "$@"; gpus=$2; shift 2 ;;
        --port) need_value "$@"; port=$2; shift 2 ;;
        --log-dir) need_value "$@"; log_dir=$2; shift 2 ;;
        --grace) need_value "$@"; grace=$2; shift 2 ;;
        --python) need_value "$@"; python=$2; shift 2 ;;
        --module) need_value "$@"; module=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage_error "unknown option $1" ;;
        *) usage_error "unexpected argument '$1' (mgjax.train's arguments go after --)" ;;
    esac
done
train_args=("$@")

require --processes "$processes"
check_int --processes "$processes" 1
[[ -z $devices ]] || check_int --devices-per-process "$devices" 1
[[ -z $gpus ]] || check_int --gpus-per-process "$gpus" 1
[[ -z $devices || -z $gpus ]] \
    || usage_error "--devices-per-process (CPU) and --gpus-per-process (GPU) exclude each other"
check_int --port "$port" 1 65535
check_int --grace "$grace" 0
require --log-dir "$log_dir"

env_words=()
if [[ -n $devices ]]; then
    # appended, so flags the caller already exports still reach every process
    env_words=(env JAX_PLATFORMS=cpu
               "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices")
fi

command_for() {  # PROCESS_ID: sets cmd
    cmd=("${env_words[@]}" "$python" -m "$module" "${train_args[@]}"
         --set distributed.mode=explicit --set "distributed.coordinator=localhost:$port"
         --set "distributed.num_processes=$processes" --set "distributed.process_id=$1")
    if [[ -n $gpus ]]; then
        local ids='' d
        for ((d = $1 * gpus; d < ($1 + 1) * gpus; d++)); do ids+=${ids:+,}$d; done
        cmd+=(--set "distributed.local_device_ids=[$ids]")
    fi
}

log_of() {
    printf '%s/process_%d.log' "$log_dir" "$1"
}

if ((dry_run)); then
    for ((i = 0; i < processes; i++)); do
        command_for "$i"
        printf '%s > %s 2>&1\n' "$(quote_words "${cmd[@]}")" "$(quote_words "$(log_of "$i")")"
    done
    exit 0
fi

require_tool "$python" "Python 3 (or name one with --python)"
mkdir -p "$log_dir"

pids=()

any_alive() {
    local pid
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then return 0; fi
    done
    return 1
}

stop_all() {
    local ticks
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    # mgjax.train saves a checkpoint on SIGTERM; a peer that died can make that save hang, hence the SIGKILL
    for ((ticks = 0; ticks < grace * 5; ticks++)); do
        any_alive || break
        sleep 0.2
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
}

on_signal() {  # EXIT_STATUS
    printf '%s: interrupted; stopping all processes (SIGKILL after %d s)\n' "$PROG" "$grace" >&2
    stop_all
    exit "$1"
}
# background jobs of a script ignore SIGINT, so a Ctrl-C reaches the processes only through this trap
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

for ((i = 0; i < processes; i++)); do
    command_for "$i"
    "${cmd[@]}" >"$(log_of "$i")" 2>&1 &
    pids[i]=$!
done
printf '%s: started %d processes; process i logs to %s\n' "$PROG" "$processes" "$log_dir/process_<i>.log" >&2

# Polled rather than `wait -n -p` (bash >= 5.1), which would tell which process ended but not run on older bash.
while ((${#pids[@]})); do
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
        status=0
        wait "${pids[i]}" || status=$?
        unset 'pids[i]'
        if ((status)); then
            log=$(log_of "$i")
            printf '%s: process %d failed with exit status %d; its log: %s\n' "$PROG" "$i" "$status" "$log" >&2
            if [[ -s $log ]]; then
                printf '%s: last lines of %s:\n' "$PROG" "$log" >&2
                tail -n 20 "$log" >&2
            fi
            printf '%s: stopping the other processes (SIGKILL after %d s)\n' "$PROG" "$grace" >&2
            stop_all
            exit "$status"
        fi
    done
    sleep 0.2
done
printf '%s: all %d processes finished; logs in %s\n' "$PROG" "$processes" "$log_dir" >&2
