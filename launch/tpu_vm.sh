#!/usr/bin/env bash
# mgjax.train on every worker of a Cloud TPU VM slice over `gcloud ... ssh --worker=all` (docs/launch.md).
set -euo pipefail
here=${BASH_SOURCE[0]%/*}
[[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
    cat <<EOF
usage: $PROG --tpu NAME --zone ZONE [options] [-- MGJAX_TRAIN_ARGS...]

Runs \`cd REPO_DIR && python3 -m mgjax.train MGJAX_TRAIN_ARGS --set distributed.mode=tpu\` on all workers of the
TPU VM NAME through one \`gcloud compute tpus tpu-vm ssh --worker=all\`; each worker needs the repository at
REPO_DIR with mgjax installed. The remote command is quoted for bash (printf %q).

options:
  --tpu NAME       TPU VM name (required)
  --zone ZONE      its zone (required)
  --project P      Google Cloud project (default: gcloud's configured one)
  --repo-dir DIR   repository on the workers, absolute or relative to the remote home (default mgjax)
  --dry-run        print the command and run nothing
  -h, --help       show this help
EOF
}

tpu='' zone='' project='' repo_dir=mgjax dry_run=0
while (($#)); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"
    case $1 in
        --tpu) need_value "$@"; tpu=$2; shift 2 ;;
        --zone) need_value "$@"; zone=$2; shift 2 ;;
        --project) need_value "$@"; project=$2; shift 2 ;;
        --repo-dir) need_value "$@"; repo_dir=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage_error "unknown option $1" ;;
        *) usage_error "unexpected argument '$1' (mgjax.train's arguments go after --)" ;;
    esac
done
require --tpu "$tpu"
require --zone "$zone"
require --repo-dir "$repo_dir"

remote="cd $(quote_words "$repo_dir") && $(quote_words python3 -m mgjax.train "$@" --set distributed.mode=tpu)"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -z $project ]] || cmd+=("--project=$project")
cmd+=(--worker=all "--command=$remote")

if ((dry_run)); then
    printf '%s\n' "$(quote_words "${cmd[@]}")"
    exit 0
fi
require_tool gcloud "the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
printf '%s: running %s\n' "$PROG" "$(quote_words "${cmd[@]}")" >&2
exec "${cmd[@]}"
