#!/usr/bin/env bash
# Fetch the wheels a bare GPU machine lacks into .whl/ (git-ignored), for scripts/gpu_check.sh.
#
# The GPU machines this project is lent (Python 3.12, a CUDA torch and Lightning preinstalled,
# no network) have every dependency of llm-lightning except these pure-Python packages (and
# zstandard, a small compiled one): jsonargparse[signatures] (the CLI), its docstring-parser and
# typeshed-client, and zstandard (.zst corpora). Run this where pip can reach PyPI, then carry
# .whl/ along with the repository; gpu_check.sh installs them from there, with no index.
#
#   bash scripts/gpu_wheels.sh            # -> .whl/*.whl for CPython 3.12 on x86-64 Linux
#   PY_VERSION=3.11 bash scripts/gpu_wheels.sh   # another target Python
#
# Versions are the ones the test suite runs with; one version of each (two stop pip's install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PACKAGES=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 zstandard==0.25.0)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${PACKAGES[@]}"
ls -1 .whl
