#!/usr/bin/env bash
# Runs the whole test suite under JAX, the backend-parity subset under TensorFlow, and the plugins' tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_ENABLE_ONEDNN_OPTS=0 TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0
KERAS_BACKEND=jax python -m pytest -q -p no:cacheprovider tests "$@"
# pytest exits 5 when a marker selects nothing; the parity subset may legitimately be empty while it grows.
KERAS_BACKEND=tensorflow python -m pytest -q -p no:cacheprovider -m tf_parity tests || [ $? -eq 5 ]
for plugin in plugins/*/; do
  [ -d "$plugin/tests" ] && KERAS_BACKEND=jax python -m pytest -q -p no:cacheprovider "$plugin/tests"
done
