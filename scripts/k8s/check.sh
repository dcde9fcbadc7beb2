#!/usr/bin/env bash
# make k8s-check: every overlay under k8s/overlays renders with `kubectl kustomize`, every
# object it renders passes `kubernetes-validate --strict` (offline schemas), and checkov's
# Kubernetes checks (over the rendered overlays) and Dockerfile checks pass; the mesh
# overlay's Envoy configurations load in Envoy when it is installed. Findings kept
# on purpose are skipped where they arise, each with its reason: `checkov.io/skipN`
# annotations in k8s/ and `# checkov:skip=` lines in the Dockerfile.
#
# Custom resources (cert-manager's Certificate and Issuer in the dev overlay) have no
# schema in kubernetes-validate; it warns about them and validates everything else.
set -euo pipefail
bin=${K8S_TOOLS:?set K8S_TOOLS to the venv bin directory}
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

overlays=()
for dir in "$root"/k8s/overlays/*/; do
    name=$(basename "$dir")
    overlays+=("$name")
    "$bin/kubectl" kustomize "$dir" > "$out/$name.yaml"
    objects=$(grep -c '^kind:' "$out/$name.yaml")
    echo "k8s-check: overlay $name renders ($objects objects)"
    "$bin/kubernetes-validate" --strict --quiet "$out/$name.yaml" 2>&1 \
        | grep -v "Couldn't find schema for kind \(Certificate\|Issuer\) with api version cert-manager.io/v1" || true
    # grep above only filters the expected warnings; the exit status is the validator's:
    "$bin/kubernetes-validate" --strict --quiet --no-warn "$out/$name.yaml"
    echo "k8s-check: overlay $name validates (kubernetes-validate --strict)"
done
# The example of the Secret the production overlay reads is a valid object too.
"$bin/kubernetes-validate" --strict --quiet --no-warn "$root/k8s/overlays/production/database-secret.example.yaml"
[ "${#overlays[@]}" -ge 4 ] || { echo "k8s-check: expected the dev, mesh, production and production-tier-a overlays"; exit 1; }

# Every service's config file in the base is one the binary accepts.
if [ -x "${KILN:-}" ]; then
    for service in auth build agent; do
        "$KILN" config check --service "$service" "$root/k8s/base/config/$service.toml" > /dev/null
    done
else
    echo "k8s-check: KILN (the kiln binary) not given: the base config files are not checked"
fi

# The mesh overlay's Envoy configurations load in Envoy itself (`--mode validate`), with
# throwaway certificates in place of the pod's Secret; skipped, saying so, without Envoy.
envoy="$root/.tools/bin/envoy"
if [ -x "$envoy" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=k8s-check \
        -keyout "$out/tls.key" -out "$out/tls.crt" 2>/dev/null
    cp "$out/tls.crt" "$out/ca.crt"
    for config in "$root"/k8s/overlays/mesh/envoy/*.yaml; do
        sed "s|/etc/kiln/tls|$out|g" "$config" > "$out/envoy.yaml"
        "$envoy" --mode validate -c "$out/envoy.yaml" --log-level error > /dev/null \
            || { echo "k8s-check: Envoy refuses $config"; exit 1; }
        echo "k8s-check: $(basename "$config") loads in Envoy"
    done
else
    echo "k8s-check: Envoy not installed (make tools): the mesh overlay's Envoy configurations are not loaded"
fi

"$bin/checkov" --framework kubernetes --skip-download --quiet --compact -d "$out" -o cli
"$bin/checkov" --framework dockerfile --skip-download --quiet --compact -f "$root/Dockerfile" -o cli
echo "k8s-check: OK (${overlays[*]})"
