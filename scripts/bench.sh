#!/usr/bin/env bash
# `make bench`: our fit path and plain loop against litgpt and Hugging Face, side by side on
# this machine, then time-to-loss / the quality bar on tinyshakespeare. Results go to
# bench_out/ (throughput.md, quality.md and their .json). About 12-15 minutes on a 2-core CPU.
#
#   bash scripts/bench.sh                 # everything
#   bash scripts/bench.sh throughput      # only the side-by-side tokens/s
#   bash scripts/bench.sh quality         # only time-to-loss / the quality bar
#   bash scripts/bench.sh ablation        # only what each optimization is worth (our step, undone one at a time)
#   bash scripts/bench.sh init            # our model under six weight initialisations (~25 min; not in `all`)
#   bash scripts/bench.sh recipe          # time to litgpt's best loss: our default recipe, 2 corpora x 3 seeds, ablation
#   BENCH_INIT_SEEDS="1 2"                # also repeat the quality part with these initial-weight seeds
#   BENCH_QUICK=1 bash scripts/bench.sh   # a short version (1 round, fewer steps)
#   BENCH_CORPUS=FILE                     # corpus for the quality part (default: tinyshakespeare)
#   BENCH_BF16=1                          # time bf16-mixed even on a CPU without fast bf16
#   BENCH_PEERS=litgpt                    # peers trained for the quality part (default litgpt,hf)
#   BENCH_OURS_ARGS="--model.init_std 0.02"  # extra flags for our fit in the quality part
set -euo pipefail
cd "$(dirname "$0")/.."

PART="${1:-all}"
PY=.venv/bin/python
PEER_VENV=.venv-bench
OUT="${BENCH_OUT:-bench_out}"
mkdir -p "$OUT"
CORPUS="${BENCH_CORPUS:-/work/shared/data/tinyshakespeare.txt}"
TORCH_PIN="${TORCH:-torch==2.13.0}"

# The peers live in their own environment: never dependencies of the project. Torch is pinned
# in the same pip command so that pip cannot pull a multi-GB CUDA build.
if [ ! -x "$PEER_VENV/bin/python" ] || ! "$PEER_VENV/bin/python" -c "import litgpt, transformers" 2>/dev/null; then
    echo "creating $PEER_VENV (torch, litgpt, transformers from PyPI) ..."
    python3 -m venv "$PEER_VENV"
    "$PEER_VENV/bin/pip" install -q --upgrade pip
    "$PEER_VENV/bin/pip" install -q "$TORCH_PIN" litgpt transformers
fi

if [ -n "${BENCH_QUICK:-}" ]; then
    THROUGHPUT_ARGS=(--rounds 1 --steps 4 --warmup 2)
    QUALITY_ARGS=(--steps 60 --eval_interval 20 --warmup_steps 6)
    ABLATION_ARGS=(--steps 4 --warmup 1)
else
    THROUGHPUT_ARGS=(--rounds 3 --steps 10 --warmup 3)
    QUALITY_ARGS=(--steps 240 --eval_interval 40 --warmup_steps 24)
    ABLATION_ARGS=(--steps 16 --warmup 2)
fi

# bf16 matrix products are emulated (tens of times slower than fp32) on CPUs without
# avx512_bf16 or AMX: timing bf16-mixed there would take an hour and say nothing useful.
PRECISIONS="32-true,bf16-mixed"
if ! $PY -c "import sys, torch; from llm_lightning.training.throughput import cpu_has_fast_bf16; \
sys.exit(0 if torch.cuda.is_available() or cpu_has_fast_bf16() else 1)" && [ -z "${BENCH_BF16:-}" ]; then
    echo "note: this CPU has no avx512_bf16/AMX, so bf16-mixed is skipped (BENCH_BF16=1 forces it)"
    PRECISIONS="32-true"
fi

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ "$PART" = all ] || [ "$PART" = throughput ]; then
    echo "== throughput: ours (fit, loop) vs litgpt vs Hugging Face, $PRECISIONS =="
    $PY -m benchmarks.compare --peer_python "$PEER_VENV/bin/python" --out "$OUT" \
        --precisions "$PRECISIONS" "${THROUGHPUT_ARGS[@]}"
fi

if [ "$PART" = all ] || [ "$PART" = ablation ]; then
    echo "== ablation: our step with one optimization undone at a time =="
    $PY -m benchmarks.ablation "${ABLATION_ARGS[@]}" --json "$OUT/ablation.json" | tee "$OUT/ablation.txt"
fi

if [ "$PART" = all ] || [ "$PART" = quality ]; then
    echo "== time to loss / quality bar: llm-lightning fit vs litgpt plain loop =="
    if [ -f "$CORPUS" ]; then
        $PY -m benchmarks.quality --peer_python "$PEER_VENV/bin/python" --corpus "$CORPUS" \
            --out "$OUT" --peers "${BENCH_PEERS:-litgpt,hf}" --ours_args "${BENCH_OURS_ARGS:-}" "${QUALITY_ARGS[@]}"
        for seed in ${BENCH_INIT_SEEDS:-}; do  # is the margin more than the luck of one draw?
            echo "== quality bar again, initial weights from seed $seed =="
            $PY -m benchmarks.quality --peer_python "$PEER_VENV/bin/python" --corpus "$CORPUS" \
                --out "$OUT/seed$seed" --peers "${BENCH_PEERS:-litgpt,hf}" --init_seed "$seed" "${QUALITY_ARGS[@]}"
        done
    else
        echo "skipped: no corpus at $CORPUS (set BENCH_CORPUS=FILE to a text file such as tinyshakespeare.txt)"
    fi
fi

if [ "$PART" = all ] || [ "$PART" = recipe ]; then
    echo "== recipe: time to litgpt's best 300-step loss, our fit's default recipe, two corpora =="
    CORPORA=(--demo)
    if [ -f "$CORPUS" ]; then CORPORA+=(--corpus "$CORPUS"); fi
    $PY -m benchmarks.recipe --peer_python "$PEER_VENV/bin/python" --out "$OUT" "${CORPORA[@]}" \
        --ours_old --ablate ${BENCH_QUICK:+--seeds 0 --steps 60}
fi

if [ "$PART" = init ]; then
    echo "== weight initialisation: our model, same tokens and schedule, six init schemes =="
    if [ -f "$CORPUS" ]; then
        $PY -m benchmarks.init --corpus "$CORPUS" --out "$OUT" "${QUALITY_ARGS[@]}"
    else
        echo "skipped: no corpus at $CORPUS (set BENCH_CORPUS=FILE)"
    fi
fi
