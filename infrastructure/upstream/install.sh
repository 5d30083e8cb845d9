#!/usr/bin/env bash
# Install the pinned upstreams into the current kubectl context: cert-manager, Argo Workflows,
# the Kubeflow Training Operator (v1: PyTorchJob) and KServe in Standard (raw Deployment) mode.
#   infrastructure/upstream/install.sh          (make upstream)
#   DRY_RUN=1 infrastructure/upstream/install.sh   prints the commands instead
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=versions.env
. ./versions.env
KUBECTL=${KUBECTL:-kubectl}
GH=https://github.com

run() {
  echo "+ $*"
  if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}

# cert-manager: KServe's webhook certificates.
run "$KUBECTL" apply --server-side -f \
  "$GH/cert-manager/cert-manager/releases/download/$CERT_MANAGER_VERSION/cert-manager.yaml"
run "$KUBECTL" -n cert-manager wait --for=condition=Available deployment --all --timeout=300s

# Argo Workflows: controller and server (client auth mode: callers bring a token).
run "$KUBECTL" apply --server-side -f - <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: argo}
YAML
run "$KUBECTL" apply --server-side -n argo -f \
  "$GH/argoproj/argo-workflows/releases/download/$ARGO_WORKFLOWS_VERSION/install.yaml"
run "$KUBECTL" -n argo wait --for=condition=Available deployment --all --timeout=300s
# Pod Security "restricted" for the containers Argo adds to each step pod (the controller reloads
# its ConfigMap on change).
run "$KUBECTL" -n argo patch configmap workflow-controller-configmap --type merge \
  --patch-file argo-executor.yaml

# Training Operator v1, standalone (the PyTorchJob CRD and its controller).
run "$KUBECTL" apply --server-side -k \
  "$GH/kubeflow/trainer.git/manifests/overlays/standalone?ref=$TRAINING_OPERATOR_VERSION"
run "$KUBECTL" -n kubeflow wait --for=condition=Available deployment --all --timeout=300s
# Pod Security "restricted" for the init container the operator adds to Worker pods.
run "$KUBECTL" apply --server-side -f pytorch-init-container.yaml
run "$KUBECTL" -n kubeflow patch deployment training-operator --type strategic \
  --patch-file training-operator.yaml
run "$KUBECTL" -n kubeflow rollout status deployment/training-operator --timeout=300s

# KServe: CRDs and controller, then the cluster resources. The pipeline's InferenceService asks
# for Standard mode itself (cluster.serving_mode), so neither Knative nor Istio is needed.
run "$KUBECTL" apply --server-side -f \
  "$GH/kserve/kserve/releases/download/$KSERVE_VERSION/kserve.yaml"
run "$KUBECTL" -n kserve wait --for=condition=Available deployment --all --timeout=300s
run "$KUBECTL" apply --server-side -f \
  "$GH/kserve/kserve/releases/download/$KSERVE_VERSION/kserve-cluster-resources.yaml"
# Pod Security "restricted" for the storage initializer KServe adds to predictor pods.
run "$KUBECTL" patch clusterstoragecontainer default --type merge \
  --patch-file storage-initializer.yaml
echo "upstreams installed: cert-manager $CERT_MANAGER_VERSION, Argo Workflows" \
  "$ARGO_WORKFLOWS_VERSION, Training Operator $TRAINING_OPERATOR_VERSION, KServe $KSERVE_VERSION"
