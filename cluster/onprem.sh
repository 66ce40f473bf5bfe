#!/usr/bin/env bash
# prunelab on your own machines: a Ray cluster by hand (no autoscaler), then the fig6 sweep.
#
#   cluster/onprem.sh head                      # on the head machine: Ray head + MLflow server
#   cluster/onprem.sh worker HEAD_IP            # on every other machine
#   cluster/onprem.sh sweep HEAD_IP [ARGS...]   # on the head: the fig6 sweep (ARGS go to sweeps/fig6.py)
#   cluster/onprem.sh stop                      # on every machine: stop Ray (and, on the head, MLflow)
#
# Every machine needs: this checkout at the same commit with its .venv (or set PRUNELAB_PYTHON_BIN),
# the directory PRUNELAB_SHARED (default /shared/prunelab) mounted at the same path (NFS or similar:
# the chain store, Ray's results, the data), and the same Ray auth token: ~/.ray/auth_token (create
# it once with `ray get-auth-token --generate` and copy it, or share the home directory), or
# RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH.
#
# Settings (environment): PRUNELAB_SHARED, RAY_PORT (6379), MLFLOW_PORT (5000), NUM_CPUS / NUM_GPUS
# (default: what Ray detects), PRUNELAB_PYTHON_BIN (default: <checkout>/.venv/bin),
# PRUNELAB_MLFLOW_ALLOWED_HOSTS (more Host headers the MLflow server answers, e.g. "mlflow.lab:*").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${PRUNELAB_PYTHON_BIN:-$here/.venv/bin}"
shared="${PRUNELAB_SHARED:-/shared/prunelab}"
ray_port="${RAY_PORT:-6379}"
mlflow_port="${MLFLOW_PORT:-5000}"
mlflow_dir="$HOME/prunelab-mlflow"   # SQLite wants a local disk, not NFS
export RAY_AUTH_MODE=token           # token authentication on every node (Ray >= 2.52)

die() { echo "onprem.sh: $*" >&2; exit 2; }

resources() {
  local args=()
  [[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
  [[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
  echo "${args[@]:-}"
}

need_token() {
  "$bin/ray" get-auth-token > /dev/null 2>&1 || die "no Ray auth token: run '$bin/ray get-auth-token --generate' on the head and copy ~/.ray/auth_token to every machine"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  head)
    need_token
    mkdir -p "$shared/results" "$mlflow_dir"
    # shellcheck disable=SC2046
    "$bin/ray" start --head --port "$ray_port" --dashboard-host 0.0.0.0 $(resources)
    if [[ -f "$mlflow_dir/server.pid" ]] && kill -0 "$(cat "$mlflow_dir/server.pid")" 2> /dev/null; then
      echo "MLflow server already running (pid $(cat "$mlflow_dir/server.pid"))"
    else
      # Artifacts go through the server (--artifacts-destination): clients need no access to the
      # directory. The Host headers it answers (others get 403): the head's names and IPv4 addresses
      # (what `sweep HEAD_IP` and the workers use; a private IP alone would pass MLflow's default
      # list, but an explicit list replaces that default), localhost for ssh tunnels, and
      # PRUNELAB_MLFLOW_ALLOWED_HOSTS.
      hosts="$(hostname):*,$(hostname -f 2> /dev/null || hostname):*,localhost:*,127.0.0.1:*"
      for ip in $(hostname -I 2> /dev/null || true); do
        if [[ "$ip" == *.* ]]; then hosts+=",$ip:*"; fi
      done
      if [[ -n "${PRUNELAB_MLFLOW_ALLOWED_HOSTS:-}" ]]; then hosts+=",$PRUNELAB_MLFLOW_ALLOWED_HOSTS"; fi
      nohup "$bin/mlflow" server --backend-store-uri "sqlite:///$mlflow_dir/mlflow.db" \
        --artifacts-destination "$shared/mlflow-artifacts" --allowed-hosts "$hosts" \
        --host 0.0.0.0 --port "$mlflow_port" > "$mlflow_dir/server.log" 2>&1 &
      echo $! > "$mlflow_dir/server.pid"
      echo "MLflow server on port $mlflow_port (pid $!, log $mlflow_dir/server.log), answering $hosts"
    fi
    ;;
  worker)
    [[ $# -ge 1 ]] || die "usage: onprem.sh worker HEAD_IP"
    need_token
    # shellcheck disable=SC2046
    "$bin/ray" start --address "$1:$ray_port" $(resources)
    ;;
  sweep)
    [[ $# -ge 1 ]] || die "usage: onprem.sh sweep HEAD_IP [fig6 args...]"
    head_ip="$1"; shift
    cd "$here"
    PRUNELAB_SHARED_STORAGE=1 "$bin/python" sweeps/fig6.py --address "$head_ip:$ray_port" \
      --storage-path "$shared/results" --tracking-uri "http://$head_ip:$mlflow_port" "$@"
    ;;
  stop)
    "$bin/ray" stop
    if [[ -f "$mlflow_dir/server.pid" ]]; then
      kill "$(cat "$mlflow_dir/server.pid")" 2> /dev/null || true
      rm -f "$mlflow_dir/server.pid"
    fi
    ;;
  *)
    sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
