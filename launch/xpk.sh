#!/usr/bin/env bash
# mgjax.train as an xpk workload on a GKE TPU cluster, one or more slices (docs/launch.md).
set -euo pipefail
here=${BASH_SOURCE[0]%/*}
[[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
    cat <<EOF
usage: $PROG --cluster C --tpu-type TYPE --docker-image IMG [options] [-- MGJAX_TRAIN_ARGS...]

Creates an xpk workload that runs \`python3 -m mgjax.train MGJAX_TRAIN_ARGS --set distributed.mode=tpu\` on every
host of N slices of TYPE, in the image's working directory. With N > 1 it also passes --set mesh.dcn_data=N (data
parallelism across slices) unless MGJAX_TRAIN_ARGS set mesh.dcn_data themselves.

options:
  --cluster C         xpk (GKE) cluster (required)
  --tpu-type TYPE     slice type, e.g. v5p-128 (required)
  --docker-image IMG  image with mgjax installed, run as it is (required)
  --num-slices N      number of slices (default 1)
  --workload NAME     workload name (default mgjax-<local date>-<time>)
  --project P         Google Cloud project (default: gcloud's configured one)
  --zone Z            the cluster's zone (default: gcloud's configured one)
  --dry-run           print the command and run nothing
  -h, --help          show this help
EOF
}

cluster='' tpu_type='' image='' slices=1 workload='' project='' zone='' dry_run=0
while (($#)); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"
    case $1 in
        --cluster) need_value "$@"; cluster=$2; shift 2 ;;
        --tpu-type) need_value "$@"; tpu_type=$2; shift 2 ;;
        --docker-image) need_value "$@"; image=$2; shift 2 ;;
        --num-slices) need_value "$@"; slices=$2; shift 2 ;;
        --workload) need_value "$@"; workload=$2; shift 2 ;;
        --project) need_value "$@"; project=$2; shift 2 ;;
        --zone) need_value "$@"; zone=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage_error "unknown option $1" ;;
        *) usage_error "unexpected argument '$1' (mgjax.train's arguments go after --)" ;;
    esac
done
require --cluster "$cluster"
require --tpu-type "$tpu_type"
require --docker-image "$image"
check_int --num-slices "$slices" 1
[[ -n $workload ]] || printf -v workload 'mgjax-%(%Y%m%d-%H%M%S)T' -1

train=(python3 -m mgjax.train "$@")
# slices talk over the data-centre network, much slower than the chips' links inside a slice: only the gradient
# reduction of data parallelism should cross it
if ((slices > 1)) && ! has_set_key mesh.dcn_data "$@"; then
    train+=(--set "mesh.dcn_data=$slices")
fi
train+=(--set distributed.mode=tpu)

cmd=(xpk workload create --cluster "$cluster" --workload "$workload" --docker-image "$image"
     "--tpu-type=$tpu_type" "--num-slices=$slices")
[[ -z $project ]] || cmd+=("--project=$project")
[[ -z $zone ]] || cmd+=("--zone=$zone")
cmd+=(--command "$(quote_words "${train[@]}")")

if ((dry_run)); then
    printf '%s\n' "$(quote_words "${cmd[@]}")"
    exit 0
fi
require_tool xpk "xpk (pip install xpk)"
printf '%s: running %s\n' "$PROG" "$(quote_words "${cmd[@]}")" >&2
exec "${cmd[@]}"
