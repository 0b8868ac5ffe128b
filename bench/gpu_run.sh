#!/usr/bin/env bash
# One command for a lent GPU machine (issue 11 item 5, issue 10 item 3), run from anywhere:
#
#     bash bench/gpu_run.sh                    # GPU: versions, scripts/cuda_check.py, bench/bench_gpu.py
#     GPU_RUN_SMOKE=1 bash bench/gpu_run.sh    # CPU rehearsal here (.venv, tiny model, ~2-3 min)
#
# Needs the git-ignored tokenizer folder bench/.gpu_assets (bench/bench_gpu.py --make-assets; carry it).
# Uses `python3` (override with PYTHON=...), PYTHONPATH=. (no install), no network.
# Wall-clock guards: cuda_check 120 s, bench_gpu 330 s (its own phase budget 280 s, partial results
# written on SIGTERM); worst case ~7.8 min in all. Logs and bench_gpu.json go to $OUT (default
# /tmp/gpu_run_out). Exit code: 0 when both passed, else the first non-zero one.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_run_out}"
mkdir -p "$OUT"
export OUT
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1

if [ "${GPU_RUN_SMOKE:-0}" = "1" ]; then
    PY="${PYTHON:-.venv/bin/python}"
    CHECK_ARGS=(--cpu --only-precision)
    BENCH_ARGS=(--smoke --budget 120)
    T_CHECK=150; T_BENCH=170
else
    PY="${PYTHON:-python3}"
    CHECK_ARGS=(--device cuda)
    BENCH_ARGS=(--budget 280)
    T_CHECK=120; T_BENCH=330
fi

if [ ! -f bench/.gpu_assets/tokenizer.json ]; then
    echo "bench/.gpu_assets/tokenizer.json is missing: run '.venv/bin/python bench/bench_gpu.py --make-assets'" \
         "where steerdesk's venv is, and carry bench/.gpu_assets" | tee "$OUT/gpu_run.log"
    exit 2
fi

{
    echo "== gpu_run $(date -u +%FT%TZ) smoke=${GPU_RUN_SMOKE:-0} python=$PY"
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "(no nvidia-smi)"; fi
    grep -m1 "model name" /proc/cpuinfo; echo "cpus $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$PY" - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
try:
    import gguf  # noqa: F401
    print("gguf: installed")
except ImportError:
    print("gguf: not installed (not needed on this path)")
EOF
} 2>&1 | tee "$OUT/versions.log"

echo "== cuda_check (limit ${T_CHECK} s)" | tee "$OUT/cuda_check.log"
t0=$(date +%s)
timeout -k 10 "$T_CHECK" "$PY" scripts/cuda_check.py bench/.gpu_assets "${CHECK_ARGS[@]}" 2>&1 \
    | grep --line-buffered -v -E "^(Loading weights|Writing model shards)" | tee -a "$OUT/cuda_check.log"
rc_check=${PIPESTATUS[0]}
echo "== cuda_check exit $rc_check after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/cuda_check.log"

echo "== bench_gpu (limit ${T_BENCH} s)" | tee "$OUT/bench_gpu.log"
t0=$(date +%s)
# progress (stderr) to the screen and the log; the JSON (stdout) to bench_gpu.stdout and bench_gpu.json
timeout -k 15 "$T_BENCH" "$PY" bench/bench_gpu.py "${BENCH_ARGS[@]}" --json "$OUT/bench_gpu.json" \
    2>&1 1>"$OUT/bench_gpu.stdout" | tee -a "$OUT/bench_gpu.log"
rc_bench=${PIPESTATUS[0]}
echo "== bench_gpu exit $rc_bench after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/bench_gpu.log"

if [ -f "$OUT/bench_gpu.json" ]; then
    "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({'summary': d.get('summary'), 'errors': d.get('errors'), 'interrupted': d.get('interrupted')}, indent=1))" \
        "$OUT/bench_gpu.json" | tee "$OUT/summary.txt"
fi
echo "== done: cuda_check $rc_check, bench_gpu $rc_bench; files in $OUT"
[ "$rc_check" -ne 0 ] && exit "$rc_check"
exit "$rc_bench"
