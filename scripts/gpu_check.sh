#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): the bf16 GEMM ceiling, the small preset's recipe at
# 32 x 2048 tokens eager / compiled / compiled with cuDNN attention first, a nanochat-style
# baseline, each preset's peak memory, and a CLI fit with a resume. One JSON line per
# measurement is appended to DIR/gpu_check.jsonl as it ends. Under 8 minutes on one H100/H200.
#
#   bash scripts/gpu_check.sh [--out DIR]          # default DIR: gpu_check_out
#   bash scripts/gpu_check.sh --cpu [--out DIR]    # the same code at tiny sizes on a CPU
#
# Runs from a checkout with .venv (make install), or on a bare machine whose python3 has a
# CUDA torch and Lightning but nothing else of ours and no network: run scripts/gpu_wheels.sh
# where pip reaches PyPI, carry .whl/ along, and this installs those wheels (and nothing else)
# into a folder on PYTHONPATH. PYTHON=... picks another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
NEEDED="import jsonargparse, docstring_parser, typeshed_client, lightning, torch, tokenizers, tiktoken, yaml"
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: $PY lacks packages the check needs and .whl/ has no wheels;" \
         "run scripts/gpu_wheels.sh where pip reaches PyPI and carry .whl/ here" >&2
    exit 2
  fi
  SITE=${TMPDIR:-/tmp}/llm-lightning-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "$NEEDED"  # still missing something: say what, now
fi
# The package from this checkout, installed or not (the CLI runs as python -m llm_lightning).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$@"
