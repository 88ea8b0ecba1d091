#!/usr/bin/env bash
# Submits launch/slurm.sbatch: mgjax.train on N nodes, one process per GPU (docs/launch.md).
set -euo pipefail
here=${BASH_SOURCE[0]%/*}
[[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
    cat <<EOF2
usage: $PROG --nodes N [options] [-- MGJAX_TRAIN_ARGS...]

Submits $here/slurm.sbatch with sbatch: on each of N nodes, G tasks (one per GPU) of
\`python3 -m mgjax.train MGJAX_TRAIN_ARGS --set distributed.mode=slurm\`. The job runs in the directory you submit
from, with your environment (activate the one that has mgjax first).

options:
  --nodes N              number of nodes (required)
  --gpus-per-node G      GPUs per node, one task each (default 8)
  --partition P          SLURM partition (default: the cluster's)
  --time T               time limit, e.g. 2-00:00:00 (default: the partition's)
  --sbatch-option OPT    one more sbatch option, e.g. --sbatch-option=--account=abc (repeatable)
  --dry-run              print the sbatch command and run nothing
  -h, --help             show this help
EOF2
}

nodes='' gpus=8 partition='' time_limit='' extra=() dry_run=0
while (($#)); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"
    case $1 in
        --nodes) need_value "$@"; nodes=$2; shift 2 ;;
        --gpus-per-node) need_value "$@"; gpus=$2; shift 2 ;;
        --partition) need_value "$@"; partition=$2; shift 2 ;;
        --time) need_value "$@"; time_limit=$2; shift 2 ;;
        --sbatch-option)
            # the value is itself an option, so need_value cannot vet it; it still must not swallow one of ours
            (($# >= 2)) && [[ $2 == -?* && ! $2 =~ ^(--|--dry-run|--help|-h)$ ]] \
                || usage_error "--sbatch-option needs an sbatch option, e.g. --sbatch-option=--account=abc"
            extra+=("$2")
            shift 2
            ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage_error "unknown option $1" ;;
        *) usage_error "unexpected argument '$1' (mgjax.train's arguments go after --)" ;;
    esac
done
require --nodes "$nodes"
check_int --nodes "$nodes" 1
check_int --gpus-per-node "$gpus" 1

cmd=(sbatch "--nodes=$nodes" "--ntasks-per-node=$gpus" "--gpus-per-node=$gpus")
[[ -z $partition ]] || cmd+=("--partition=$partition")
[[ -z $time_limit ]] || cmd+=("--time=$time_limit")
cmd+=("${extra[@]}" "$here/slurm.sbatch" "$@")

if ((dry_run)); then
    printf '%s\n' "$(quote_words "${cmd[@]}")"
    exit 0
fi
require_tool sbatch "SLURM's client commands (or run this on the cluster's login node)"
printf '%s: running %s\n' "$PROG" "$(quote_words "${cmd[@]}")" >&2
exec "${cmd[@]}"
