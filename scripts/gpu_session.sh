#!/usr/bin/env bash
# One short GPU session, prepared so that nothing is discovered on the GPU (docs/benchmarking.md,
# "A GPU session in minutes").
#
#   bash scripts/gpu_session.sh [--minutes 8] [--bundle FILE.tar.gz]      on one CUDA GPU
#   bash scripts/gpu_session.sh --dry-run                                 the same steps on CPU, toy sizes
#
# It installs nothing and reaches no network: it runs the python it is given (PYTHON, default
# python3) on this tree. In order (the most valuable first, each table written as soon as it is done):
#   1. device metadata        results/<device>/session.json (nvidia-smi, torch, CUDA, cuDNN, driver)
#   2. the CUDA tests         tests/test_gpu.py
#   3. throughput tables      repaformer-1, riformer-8, sit-2, then riformer-6, repaformer-2, sit-3:
#                             the papers' batch sizes and dtypes, torch.compile off; fewer timed passes
#                             than the protocols so that they fit (--full-protocol: as written)
#   4. plan calibration       `reproduce plan --measure-rates`: a few training steps per recipe
# Every step runs under the time left before the deadline (--minutes from the start) and is stopped
# with SIGINT when it runs out: a table interrupted writes nothing, but its finished measurements are
# cached, so the next session resumes it. The summary of every step goes into session.json.
#
# --dry-run: CPU, the tables' CPU protocols on two or three small rows each, results and cache in a
# scratch folder (or --results-dir), fvcore hidden (the GPU machine has none), the CUDA tests
# collected and skipped. CI runs it (.ci/run).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
MINUTES=8
BUNDLE=""
RESULTS=""
FULL=0
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --minutes) MINUTES=$2; shift ;;
    --bundle) BUNDLE=$2; shift ;;
    --results-dir) RESULTS=$2; shift ;;
    --full-protocol) FULL=1 ;;
    --python) PY=$2; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$MINUTES" in ''|*[!0-9.]*) echo "gpu_session.sh: --minutes takes a number, got '$MINUTES'" >&2; exit 2 ;; esac

START=$(date +%s)
DEADLINE=$(( START + ${MINUTES%.*} * 60 - 10 ))   # 10 s kept for the summary and the bundle
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  RESULTS=${RESULTS:-$SCRATCH/results}
  export REPRODUCE_CACHE="$SCRATCH/cache"
  # The GPU machine has no fvcore: the throughput path must not need it. Hide it here.
  mkdir -p "$SCRATCH/no-fvcore/fvcore"
  echo 'raise ImportError("fvcore is hidden by gpu_session.sh --dry-run: the GPU machine has none")' \
    > "$SCRATCH/no-fvcore/fvcore/__init__.py"
  export PYTHONPATH="$SCRATCH/no-fvcore:$PYTHONPATH"
else
  DEVICE=cuda
  RESULTS=${RESULTS:-results}
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_session.sh: $PY sees no CUDA device (torch missing or CPU-only); use --dry-run on CPU" >&2
    exit 2
  fi
fi

TAG=$("$PY" -c "from reproduce import measure; print(measure.device_tag('$DEVICE'))") || {
  echo "gpu_session.sh: cannot import the suite with $PY (see the error above)" >&2; exit 2; }
DEST="$RESULTS/$TAG"
mkdir -p "$DEST"
STEPS="$SCRATCH/steps.tsv"
: > "$STEPS"
echo "gpu_session: device $DEVICE ($TAG), results in $DEST, deadline in $(( DEADLINE - START )) s"

left() { echo $(( DEADLINE - $(date +%s) )); }

# step NAME MIN_SECONDS COMMAND...: run COMMAND under the time left, record what became of it.
step() {
  local name=$1 need=$2; shift 2
  local t0 rc status remaining
  remaining=$(left)
  if [ "$remaining" -lt "$need" ]; then
    echo "gpu_session: skip $name (${remaining}s left, needs ${need}s)"
    printf '%s\tskipped\t0\tout of time\n' "$name" >> "$STEPS"
    return
  fi
  echo "gpu_session: $name (${remaining}s left)"
  t0=$(date +%s)
  timeout -s INT -k 20 "$remaining" "$@" > "$SCRATCH/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=done ;;
    124|130) status=interrupted ;;
    *) status=failed ;;
  esac
  tail -n 3 "$SCRATCH/$name.log" | sed 's/^/    /'
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "exit $rc" >> "$STEPS"
}

# 1. Device metadata (also what a reader of results/<device>/ needs about the machine).
"$PY" - "$DEVICE" "$DEST/session-device.json" <<'EOF'
import json, subprocess, sys
from reproduce import measure
device, path = sys.argv[1], sys.argv[2]
env = measure.environment(device)
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit",
                                        "--format=csv,noheader"], capture_output=True, text=True,
                                       timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
json.dump(env, open(path, "w"), indent=1, default=str)
EOF

# Static cells (params, MACs, settings) do not depend on the device and need fvcore, which the GPU
# machine lacks: start each table from the committed CPU results, so that only throughput is new.
seed_static() {
  local table=$1 src
  [ -f "$DEST/$table.csv" ] && return
  src=$(ls results/cpu-*/"$table.csv" 2>/dev/null | head -n 1)
  [ -n "$src" ] && cp "$src" "$DEST/$table.csv"
}

# 2. The CUDA tests (on CPU they are collected and skip with their reason).
step cuda-tests 30 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py

# 3. Throughput. TIMING: fewer passes than the protocols (batch and dtype stay the papers').
COUNTED="--runs 5 --repeats 3 --warmup 3"     # riformer / repaformer protocols (passes)
TIMED="--runs 2 --repeats 1 --warmup 1"       # sit protocol (LeViT's loop: seconds)
if [ "$FULL" = 1 ] || [ "$DRY" = 1 ]; then COUNTED=""; TIMED=""; fi
table() {
  local table=$1 timing=$2 rows=$3
  seed_static "$table"
  step "$table" 30 "$PY" -m reproduce.cli table "$table" --columns throughput --device "$DEVICE" \
    --results-dir "$RESULTS" --quiet $timing ${rows:+--rows "$rows"}
}
if [ "$DRY" = 1 ]; then   # toy sizes: a few small rows (their baselines come with them)
  table repaformer-1 "" repa_deit_tiny
  table riformer-8 "" poolformer_s9
  table sit-2 "" sit_ti
else
  table repaformer-1 "$COUNTED" ""
  table riformer-8 "$COUNTED" ""
  table sit-2 "$TIMED" ""
fi

# 4. Plan calibration: a few training steps of each recipe at its configuration, largest first.
if [ "$DRY" = 1 ]; then
  step plan-rates 20 "$PY" -m reproduce.cli plan riformer-8 --measure-rates --device cpu --steps 1 \
    --batch-size 2 --img-size 64 --results-dir "$RESULTS" --rate-seconds 5
else
  step plan-rates 60 "$PY" -m reproduce.cli plan --all --measure-rates --device cuda --steps 3 \
    --results-dir "$RESULTS" --rate-seconds 90
fi

if [ "$DRY" = 1 ]; then
  table riformer-6 "" riformer_s12
  table repaformer-2 "" repa_deit_tiny
  table sit-3 "" deit_t
else
  table riformer-6 "$COUNTED" ""
  table repaformer-2 "$COUNTED" ""
  table sit-3 "$TIMED" ""
fi

# Summary: what ran, what was interrupted or skipped, and how long each took.
"$PY" - "$STEPS" "$DEST/session.json" "$DEST/session-device.json" "$SCRATCH" "$DRY" "$MINUTES" "${COUNTED:-protocol as written}" \
  "${TIMED:-protocol as written}" <<'EOF'
import datetime, json, subprocess, sys
from pathlib import Path
steps_path, out, device_path, scratch, dry, minutes, counted, timed = sys.argv[1:]
steps = []
for line in open(steps_path):
    name, status, seconds, note = line.rstrip("\n").split("\t")
    log = Path(scratch, f"{name}.log")
    tail = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else []
    steps.append({"step": name, "status": status, "seconds": int(seconds), "note": note, "log_tail": tail})
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "dry_run": dry == "1", "minutes": float(minutes), "commit": commit or None,
           "timing_overrides": {"riformer/repaformer (passes)": counted, "sit (seconds)": timed},
           "environment": json.load(open(device_path)), "steps": steps}
json.dump(summary, open(out, "w"), indent=1)
for s in steps:
    print(f"  {s['step']:<14} {s['status']:<12} {s['seconds']:>4} s  {s['note']}")
EOF
rm -f "$DEST/session-device.json"

if [ -n "$BUNDLE" ]; then
  cache=${REPRODUCE_CACHE:-.cache/measurements}
  tar -czf "$BUNDLE" "$DEST" $( [ -d "$cache" ] && echo "$cache" ) 2>/dev/null \
    && echo "gpu_session: bundled $DEST and the measurement cache into $BUNDLE"
fi

failed=$(awk -F'\t' '$2 == "failed"' "$STEPS" | wc -l)
echo "gpu_session: finished in $(( $(date +%s) - START )) s; results in $DEST ($failed step(s) failed)"
[ "$failed" = 0 ]
