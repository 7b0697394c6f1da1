#!/usr/bin/env bash
# Offline checks of the deployment files: hadolint on the Dockerfiles, the Kubernetes manifests
# rendered with kustomize and validated against the Kubernetes schemas, KEDA resources against
# KEDA's CRD schemas, docker/compose.yaml against the Compose Specification schema, and
# schemas/asyncapi.yaml (YAML, AsyncAPI 3, every $ref resolving), the alert rules and dashboard of
# infra/base/monitoring (structure, every metric they query known).
# Needs kubectl (kustomize built in) and the Python packages of scripts/requirements-test.txt
# (scripts/test.sh installs both); PYTHON picks the interpreter (default: python3). The KEDA and
# Compose schemas are vendored in scripts/deploy/schemas; nothing outside the repository is read,
# and any missing input is an error, never a skipped check.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
HADOLINT=${HADOLINT:-$(dirname "$PYTHON")/hadolint}
[ -x "$HADOLINT" ] || HADOLINT=hadolint

echo "== hadolint"
"$HADOLINT" --config .hadolint.yaml docker/Dockerfile docker/Dockerfile.cuda
echo "ok: docker/Dockerfile docker/Dockerfile.cuda"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for k in infra/base infra/overlays/gpu; do
  name=$(echo "$k" | tr / _)
  echo "== kubectl kustomize $k"
  kubectl kustomize "$k" > "$out/$name.yaml"
done
exec "$PYTHON" scripts/deploy/validate.py "$out"/*.yaml
