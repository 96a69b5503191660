#!/usr/bin/env bash
# One GPU node, all its GPUs: one process sees every local GPU and the mesh spans them. See docs/gpu.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/gpu/node.sh [options] [install | ARGS...]

  install              pip install this checkout with jax[cuda12] into the current Python environment
  ARGS...              run `idefics-jax ARGS...` on all of this node's GPUs (e.g. train configs/smolvlm-256m-gpu.yaml)

options:
  --gpus LIST          CUDA_VISIBLE_DEVICES for the run (default: all GPUs)
  --log FILE           also write the output to FILE (tee)
  --dry-run            print every command instead of running it
  -h, --help           this help
USAGE
}

GPUS="" LOG="" DRY_RUN=0
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
    --gpus) GPUS="$2"; shift 2 ;;
    --log) LOG="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "node.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }

if [[ $1 == install ]]; then
  run python3 -m pip install -U 'jax[cuda12]'
  run python3 -m pip install -e "$ROOT"
  exit 0
fi
env_=(env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9)
[[ -n $GPUS ]] && env_+=("CUDA_VISIBLE_DEVICES=$GPUS")
if [[ -n $LOG ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s 2>&1 | tee %q\n' "$(run "${env_[@]}" idefics-jax "$@")" "$LOG"
  else
    "${env_[@]}" idefics-jax "$@" 2>&1 | tee "$LOG"
  fi
else
  run "${env_[@]}" idefics-jax "$@"
fi
