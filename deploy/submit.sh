#!/usr/bin/env bash
# Submit `papo train` to the KubeRay cluster of deploy/ from a workstation: read the Ray auth token
# from the cluster's Secret, port-forward the head's job API, and run `papo submit` (which
# validates the config locally, uploads this checkout as the working_dir unless --no-upload, and
# with --wait follows the job and exits by its final status). Arguments go to `papo submit`:
#
#   deploy/submit.sh --wait trainer.total_steps=20
#   deploy/submit.sh --no-upload --config my.yaml --wait
#
# Environment: NAMESPACE (default: kubectl's current), RAY_CLUSTER (papo), RAY_TOKEN_SECRET
# (papo-ray-token), LOCAL_PORT (8265), PAPO (the papo command; default: papo on PATH).
set -euo pipefail

CLUSTER=${RAY_CLUSTER:-papo}
SECRET=${RAY_TOKEN_SECRET:-papo-ray-token}
PORT=${LOCAL_PORT:-8265}
PAPO=${PAPO:-papo}
KUBECTL=(kubectl)
[ -n "${NAMESPACE:-}" ] && KUBECTL+=(-n "$NAMESPACE")

command -v kubectl >/dev/null || { echo "submit.sh: kubectl not found" >&2; exit 2; }
command -v "$PAPO" >/dev/null || { echo "submit.sh: '$PAPO' not found (make; source .venv/bin/activate)" >&2; exit 2; }

workdir=$(mktemp -d)
pf_pid=""
cleanup() {
  [ -n "$pf_pid" ] && kill "$pf_pid" 2>/dev/null || true
  rm -rf "$workdir"
}
trap cleanup EXIT

# The token never touches the command line or ~/.ray: a private file, removed on exit.
umask 077
"${KUBECTL[@]}" get secret "$SECRET" -o jsonpath='{.data.auth_token}' | base64 -d > "$workdir/token"
[ -s "$workdir/token" ] || { echo "submit.sh: Secret $SECRET has no auth_token" >&2; exit 2; }

"${KUBECTL[@]}" port-forward "svc/$CLUSTER-head-svc" "$PORT:8265" >"$workdir/port-forward.log" 2>&1 &
pf_pid=$!
for _ in $(seq 1 50); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  kill -0 "$pf_pid" 2>/dev/null || { cat "$workdir/port-forward.log" >&2; exit 2; }
  sleep 0.2
done

"$PAPO" submit --address "http://127.0.0.1:$PORT" --token-file "$workdir/token" "$@"
