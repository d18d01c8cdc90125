#!/usr/bin/env bash
# Adds the manifest validators scripts/check-manifests.sh uses to the project's .venv (made by
# scripts/setup-python.sh): kubernetes-validate, which checks objects against the Kubernetes
# API's JSON schemas of a given version, and cel-python, which evaluates the CRD's CEL rules
# (x-kubernetes-validations) on the example resources. Both pinned, from PyPI. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
CEL_PYTHON_VERSION=0.5.0
VENV=.venv

bash scripts/setup-python.sh >/dev/null
installed() {
    "$VENV/bin/python" - "$KUBERNETES_VALIDATE_VERSION" "$CEL_PYTHON_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
sys.exit(version("kubernetes-validate") != sys.argv[1] or version("cel-python") != sys.argv[2])
PY
}
if installed; then
    exit 0
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "cel-python==$CEL_PYTHON_VERSION"
installed
echo "setup-validate: $VENV has kubernetes-validate $KUBERNETES_VALIDATE_VERSION and cel-python $CEL_PYTHON_VERSION" >&2
