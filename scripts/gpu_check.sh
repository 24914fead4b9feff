#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): setup, bench of the small preset in bf16 with and
# without compile, flash attention confirmed, 30-step bf16 fits with DDP(1) and FSDP2(1) plus
# resume, on real text. Under 8 minutes on one H100/H200; writes one JSON report.
#
#   bash scripts/gpu_check.sh [REPORT.json]       # default gpu_check.json
#   bash scripts/gpu_check.sh --cpu [REPORT.json] # the same steps at tiny sizes on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CPU=()
if [ "${1:-}" = "--cpu" ]; then CPU=(--cpu); shift; fi
exec "$PY" -m benchmarks.gpu_check "${CPU[@]}" --out "${1:-gpu_check.json}"
