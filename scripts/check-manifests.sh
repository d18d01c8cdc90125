#!/usr/bin/env bash
# Checks every Kubernetes manifest the project ships or generates (run by scripts/test.sh):
#   1. `helm lint --strict` of charts/hotprefix, with its default values and watching two
#      namespaces (Roles instead of a ClusterRole), against its values.schema.json;
#   2. `helm template` of both configurations, CRDs included;
#   3. the CRD in the chart's crds/ folder is byte for byte crds/ (crdgen writes both; the
#      operator's tests check they match crdgen);
#   4. `kubernetes-validate --strict` for Kubernetes 1.33 of the CRD, the rendered chart, and
#      the objects the operator generates for examples/minimal.yaml and examples/full.yaml
#      (`hotprefix-operator render`, the output the golden files pin), failing on any error
#      and on any object whose kind it has no schema for;
#   5. the images' Dockerfiles switch to the non-root user the pods run as;
#   6. examples/*.yaml against the CRD's schema and CEL rules (scripts/validate-crs.py).
# Installs what it needs first (scripts/setup-helm.sh, scripts/setup-validate.sh); safe to
# run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.33.0
CRD=crds/hotprefixservices.hotprefix.dev.yaml
# The owner uid the rendered objects carry, as the operator would give them.
UID_FOR_RENDER=6d0f7f0e-4a5c-4b7e-9a51-000000000001

bash scripts/setup-helm.sh
bash scripts/setup-validate.sh
helm=.cache/helm/bin/helm
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "check-manifests: helm lint"
"$helm" lint --strict charts/hotprefix
"$helm" lint --strict charts/hotprefix --set 'watchNamespaces={serving,batch}'

echo "check-manifests: helm template"
"$helm" template hotprefix charts/hotprefix --namespace hotprefix-system --include-crds \
    >"$out/chart-cluster.yaml"
"$helm" template hotprefix charts/hotprefix --namespace hotprefix-system --include-crds \
    --set 'watchNamespaces={serving,batch}' --set replicaCount=1 \
    --set leaderElection.enabled=false --set metrics.service.enabled=false \
    >"$out/chart-namespaced.yaml"
for kind in ClusterRole ClusterRoleBinding Deployment ServiceAccount Role RoleBinding \
    PodDisruptionBudget Service CustomResourceDefinition; do
    grep -q "^kind: $kind$" "$out/chart-cluster.yaml" || {
        echo "error: the rendered chart has no $kind" >&2
        exit 1
    }
done
if grep -q "^kind: ClusterRole" "$out/chart-namespaced.yaml"; then
    echo "error: watching namespaces must not create cluster-wide RBAC" >&2
    exit 1
fi
# Two operators reconciling at once must be refused by the values schema.
if "$helm" template hotprefix charts/hotprefix --set leaderElection.enabled=false \
    >/dev/null 2>&1; then
    echo "error: the chart accepted 2 operator replicas without leader election" >&2
    exit 1
fi

echo "check-manifests: chart CRD = $CRD"
cmp "$CRD" "charts/hotprefix/crds/$(basename "$CRD")"

echo "check-manifests: the operator's objects for the examples"
for example in minimal full; do
    cargo run --locked --quiet -p hotprefix-operator --bin hotprefix-operator -- render \
        --uid "$UID_FOR_RENDER" "examples/$example.yaml" >"$out/operator-$example.yaml"
done

echo "check-manifests: kubernetes-validate --strict (Kubernetes $KUBERNETES_VERSION)"
report="$out/kubernetes-validate.txt"
status=0
.venv/bin/kubernetes-validate --strict -k "$KUBERNETES_VERSION" \
    "$CRD" "$out"/chart-*.yaml "$out"/operator-*.yaml >"$report" 2>&1 || status=$?
if [ "$status" -ne 0 ] || grep -q '^\(ERROR\|WARN\|FATAL\)' "$report"; then
    grep -v '^INFO' "$report" >&2 || true
    echo "error: kubernetes-validate found invalid objects (or objects of unknown kinds)" >&2
    exit 1
fi
objects=$(cat "$CRD" "$out"/chart-*.yaml "$out"/operator-*.yaml | grep -c '^kind: ')
passed=$(grep -c '^INFO .* passed for resource' "$report" || true)
if [ "$passed" -ne "$objects" ]; then
    cat "$report" >&2
    echo "error: kubernetes-validate checked $passed of $objects objects" >&2
    exit 1
fi
echo "check-manifests: $passed objects valid for Kubernetes $KUBERNETES_VERSION"

echo "check-manifests: images run as non-root"
for dockerfile in docker/*.Dockerfile; do
    if [ "$(grep -c '^USER 65532:65532$' "$dockerfile")" -ne 1 ] \
        || [ "$(grep '^USER' "$dockerfile" | tail -n 1)" != "USER 65532:65532" ]; then
        echo "error: $dockerfile must end up as USER 65532:65532 (the pods' runAsUser)" >&2
        exit 1
    fi
done

echo "check-manifests: examples against the CRD"
.venv/bin/python scripts/validate-crs.py "$CRD" examples/*.yaml
# The same check must refuse what the API server refuses, or passing it says nothing: a
# schema violation (an unknown field), patterns (a claim name that is no DNS name, a
# quantity that is none) and a CEL rule (a hot-spot factor the router refuses).
for edit in 's/^  router:$/  router:\n    bogusField: 1/' 's/claimName: models$/claimName: Models_1/' \
    's/promotionBudget: 256Mi$/promotionBudget: 256 megs/' 's/hotSpotFactor: 2$/hotSpotFactor: 0.5/'; do
    sed "$edit" examples/full.yaml >"$out/refused.yaml"
    if cmp -s examples/full.yaml "$out/refused.yaml"; then
        echo "error: the edit '$edit' changed nothing in examples/full.yaml" >&2
        exit 1
    fi
    if .venv/bin/python scripts/validate-crs.py "$CRD" "$out/refused.yaml" >"$out/refused.txt"; then
        cat "$out/refused.txt" >&2
        echo "error: the CRD check accepted examples/full.yaml edited with '$edit'" >&2
        exit 1
    fi
done
echo "check-manifests: ok"
