#!/usr/bin/env bash
# idefics-jax on TPU slices in a GKE cluster, through xpk: build and push the image, create the cluster, run an
# idefics-jax command on N slices, read its logs, delete. See docs/tpu.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/xpk/xpk.sh [options] COMMAND [ARGS...]

commands:
  image                build this checkout's Docker image (jax[tpu] + idefics-jax) and push it to --image
  create               create the GKE cluster with --slices TPU slices of --type
  run ARGS...          run `idefics-jax ARGS...` on every host of the --slices slices as one xpk workload; a
                       training command gets mesh.data=SLICES (the data axis over the slices, across DCN)
  logs                 print the end of the workload's logs (process 0 prints the training lines)
  delete               delete the workload, then the cluster

options:
  --cluster NAME       cluster name (default: idefics-jax)
  --workload NAME      workload name (default: idefics-jax-run)
  --zone ZONE          zone (default: us-west4-a)
  --project PROJECT    GCP project (default: gcloud's)
  --type TYPE          TPU slice type: v5e-256, v5e-8, v6e-256, v5p-128, ... (default: v5e-256)
  --slices N           number of slices (default: 1)
  --image IMAGE        image to build / run (default: gcr.io/PROJECT/idefics-jax:latest)
  --spot               spot capacity (training saves on SIGTERM and resumes)
  --dry-run            print every command instead of running it
  -h, --help           this help
USAGE
}

CLUSTER=idefics-jax WORKLOAD=idefics-jax-run ZONE=us-west4-a PROJECT="" TYPE=v5e-256 SLICES=1 IMAGE="" SPOT=0
DRY_RUN=0
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
    --cluster) CLUSTER="$2"; shift 2 ;;
    --workload) WORKLOAD="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --slices) SLICES="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "xpk.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
CMD="$1"; shift
[[ $SLICES =~ ^[1-9][0-9]*$ ]] || { echo "xpk.sh: --slices must be a positive number; got $SLICES" >&2; exit 2; }

# xpk's (and gcloud's) names: v5e is "v5litepod".
ACCEL="${TYPE/v5e-/v5litepod-}"
WHERE=(--zone "$ZONE")
[[ -n $PROJECT ]] && WHERE+=(--project "$PROJECT")
[[ -n $IMAGE ]] || IMAGE="gcr.io/${PROJECT:-\$(gcloud config get-value project)}/idefics-jax:latest"

case "$CMD" in
  image)
    run docker build -t "$IMAGE" "$ROOT"
    run docker push "$IMAGE"
    ;;
  create)
    extra=(); [[ $SPOT == 1 ]] && extra=(--spot)
    run xpk cluster create --cluster "$CLUSTER" --tpu-type "$ACCEL" --num-slices "$SLICES" "${WHERE[@]}" \
      "${extra[@]}"
    ;;
  run)
    [[ $# -ge 1 ]] || { echo "xpk.sh run: give the idefics-jax arguments (e.g. train configs/x.yaml)" >&2; exit 2; }
    args=("$@")
    # Several slices: the data axis spans them (each slice a data-parallel replica, gradients summed over DCN);
    # fsdp and tensor stay inside a slice, on ICI.
    [[ $1 == train && $SLICES -gt 1 ]] && args+=("mesh.data=$SLICES")
    # IDEFICS_JAX_DISTRIBUTED=1: every host joins jax.distributed (jax finds the slices' hosts itself).
    run xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --docker-image "$IMAGE" \
      --tpu-type "$ACCEL" --num-slices "$SLICES" "${WHERE[@]}" \
      --command "IDEFICS_JAX_DISTRIBUTED=1 idefics-jax $(printf '%q ' "${args[@]}" | sed 's/ $//')"
    ;;
  logs)
    run gcloud container clusters get-credentials "$CLUSTER" "${WHERE[@]}"
    run kubectl logs --tail=50 --prefix -l "jobset.sigs.k8s.io/jobset-name=$WORKLOAD"
    ;;
  delete)
    run xpk workload delete --cluster "$CLUSTER" --workload "$WORKLOAD" "${WHERE[@]}"
    run xpk cluster delete --cluster "$CLUSTER" "${WHERE[@]}"
    ;;
  *) echo "xpk.sh: unknown command $CMD (see --help)" >&2; exit 2 ;;
esac
