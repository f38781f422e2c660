#!/usr/bin/env bash
# Runs the whole test suite under JAX, the backend-parity subset under TensorFlow, and the plugins' tests.
#
# The two suites run on KCI_TEST_WORKERS pytest-xdist workers (default 2: most tests spend their time
# compiling or in Python, on one core each; each worker holds its own models, 3 to 5 GB). Each test
# module goes to one worker as a whole (--dist loadscope), so a module's shared fixtures (a loaded model,
# a server) are built once; modules go out in collection order, where tests/conftest.py puts the slow
# ones first, so the last minutes are not one worker finishing a recipe while the other waits.
# On the 2-core CI machine this halves the run (38m55s -> 20m50s). KCI_TEST_WORKERS=0 runs the tests in
# this process, for debugging.
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_ENABLE_ONEDNN_OPTS=0 TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0
workers=(-n "${KCI_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder)
KERAS_BACKEND=jax python -m pytest -q -p no:cacheprovider -p no:benchmark "${workers[@]}" tests "$@"
# pytest exits 5 when a marker selects nothing; the parity subset may legitimately be empty while it grows.
KERAS_BACKEND=tensorflow python -m pytest -q -p no:cacheprovider -p no:benchmark "${workers[@]}" -m tf_parity tests \
  || [ $? -eq 5 ]
for plugin in plugins/*/; do
  [ -d "$plugin/tests" ] && KERAS_BACKEND=jax python -m pytest -q -p no:cacheprovider "$plugin/tests"
done
