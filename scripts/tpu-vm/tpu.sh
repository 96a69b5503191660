#!/usr/bin/env bash
# A TPU VM for idefics-jax: create it, install this checkout on every worker, run an idefics-jax command on all
# workers at once, fetch the logs, delete it. See docs/tpu.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/tpu-vm/tpu.sh [options] COMMAND [ARGS...]

commands:
  create               create the TPU VM (--queued: through a queued resource, which waits for capacity)
  install              copy this checkout to every worker and pip install it with jax[tpu] (and gs:// support)
  run ARGS...          run `idefics-jax ARGS...` on all workers at once (--worker=all), logging to ~/idefics-jax.log;
                       the program joins jax.distributed by itself on multi-host slices
  logs                 print the end of each worker's log (process 0 prints the training lines)
  delete               delete the TPU VM (and its queued resource)

options:
  --name NAME          TPU VM name (default: idefics-jax)
  --zone ZONE          zone (default: us-west4-a)
  --type TYPE          accelerator type: v5e-8, v4-8, v5litepod-16, v4-32, ... (default: v5e-8)
  --version VERSION    TPU runtime version (default: by type)
  --project PROJECT    GCP project (default: gcloud's)
  --queued             create through a queued resource
  --spot               spot capacity (cheaper, may be preempted: training saves on SIGTERM and resumes)
  --foreground         run: wait for the command instead of starting it in the background
  --dry-run            print every command instead of running it
  -h, --help           this help
USAGE
}

NAME=idefics-jax ZONE=us-west4-a TYPE=v5e-8 VERSION="" PROJECT="" QUEUED=0 SPOT=0 FOREGROUND=0 DRY_RUN=0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

run() {  # a command, printed (shell-quoted) on a dry run, else executed
  if [[ $DRY_RUN == 1 ]]; then
    local out="" a
    for a in "$@"; do  # quoted only where the shell needs it, so the line reads and pastes as typed
      if [[ $a =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
    done
    printf '%s\n' "${out% }"
  else
    "$@"
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --foreground) FOREGROUND=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "tpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
CMD="$1"; shift

# gcloud's names: v5e is "v5litepod"; each generation has its own runtime image.
ACCEL="${TYPE/v5e-/v5litepod-}"
if [[ -z $VERSION ]]; then
  case "$ACCEL" in
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
WHERE=(--zone "$ZONE")
[[ -n $PROJECT ]] && WHERE+=(--project "$PROJECT")
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all)

case "$CMD" in
  create)
    if [[ $QUEUED == 1 ]]; then
      extra=(); [[ $SPOT == 1 ]] && extra=(--spot)
      run gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" "${WHERE[@]}" \
        --accelerator-type "$ACCEL" --runtime-version "$VERSION" "${extra[@]}"
    else
      extra=(); [[ $SPOT == 1 ]] && extra=(--spot)
      run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCEL" \
        --version "$VERSION" "${extra[@]}"
    fi
    ;;
  install)
    run gcloud compute tpus tpu-vm scp --recurse "$ROOT" "$NAME:~/idefics-jax" "${WHERE[@]}" --worker=all
    run "${SSH[@]}" --command "python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e ~/idefics-jax'[gcs]'"
    ;;
  run)
    [[ $# -ge 1 ]] || { echo "tpu.sh run: give the idefics-jax arguments (e.g. train configs/x.yaml)" >&2; exit 2; }
    args="$(printf '%q ' "$@")"
    # IDEFICS_JAX_DISTRIBUTED=1: every worker joins jax.distributed (jax finds the slice's hosts itself).
    prog="IDEFICS_JAX_DISTRIBUTED=1 PATH=\$HOME/.local/bin:\$PATH"
    if [[ $FOREGROUND == 1 ]]; then
      run "${SSH[@]}" --command "cd ~/idefics-jax && $prog idefics-jax ${args% } 2>&1 | tee ~/idefics-jax.log"
    else
      run "${SSH[@]}" --command \
        "cd ~/idefics-jax && $prog nohup idefics-jax ${args% } > ~/idefics-jax.log 2>&1 < /dev/null &"
    fi
    ;;
  logs)
    run "${SSH[@]}" --command "echo \"== \$(hostname)\"; tail -n 50 ~/idefics-jax.log"
    ;;
  delete)
    if [[ $QUEUED == 1 ]]; then
      run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
    fi
    ;;
  *) echo "tpu.sh: unknown command $CMD (see --help)" >&2; exit 2 ;;
esac
