#!/usr/bin/env bash
# One GPU check, run whenever an NVIDIA GPU is at hand (about 10 minutes on an H100/4090):
#   1. set up as .ci/setup does (builds the CUDA llama-cpp-python when nvcc is there),
#   2. the tests marked `gpu` (pytest -m gpu),
#   3. chat with every layer offloaded (bench/chat.py) and its speed levers (bench/chat.py --speedups),
#   4. the serve table (bench/serve.py, selfhost only, plus n-gram speculation and KV q8_0 rows),
#   5. shakespeare-char to val loss 1.47 and MNIST, both on the GPU,
# and writes one report (figures, device, versions) from which the README's GPU table is filled.
#
#   bash bench/gpu.sh [--out bench/gpu-report.md] [--data DIR]   # on the GPU machine
#   bash bench/gpu.sh --dry-run                                  # here: every step, tiny sizes, CPU
#
# --dry-run runs each step's real command with tiny sizes on the CPU (no GPU needed), so the script
# itself is checked where no GPU is lent. Each step's output goes to the log folder beside the report.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
DRY=0
OUT=bench/gpu-report.md
DATA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --data) DATA=$2; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for candidate in "$DATA" "$REPO/shared/data" "$REPO/../shared/data"; do
  if [ -n "$candidate" ] && [ -d "$candidate/tinyshakespeare" ]; then DATA=$candidate; break; fi
done
LOGS="${OUT%.md}-logs"
mkdir -p "$LOGS"
PY=.venv/bin/python
export BENCH_GPU_LAYERS  # bench/serve.py: layers offloaded by the servers it starts
FAILED=()
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; LAYERS=0; BENCH_GPU_LAYERS=0
  CHAT_ARGS=(--max-tokens 16 --repeats 1 --threads 2)
  SPEED_ARGS=(--speedups --max-tokens 24 --repeats 1 --threads 2 --ctx 512)
  SERVE_ARGS=(--clients 1 --rounds 1 --max-tokens 8 --servers selfhost --switch-rounds 0)
  GPT_ARGS=(--preset shakespeare-char --iters 4 --eval-interval 2 --eval-iters 2 --batch-size 4 --block-size 32 --n-layer 1 --n-head 2 --n-embd 32 --no-compile)
  MNIST_ARGS=(--epochs 1 --limit 256 --test-limit 256)
  PYTEST_ARGS=(-m gpu --collect-only -q)  # collected, not run: they need the GPU
else
  DEVICE=cuda; LAYERS=-1; BENCH_GPU_LAYERS=-1
  CHAT_ARGS=(--max-tokens 256 --repeats 3 --threads 4)
  SPEED_ARGS=(--speedups --max-tokens 200 --repeats 3 --threads 4)
  SERVE_ARGS=(--clients "1,4,8,16" --rounds 2 --max-tokens 128 --servers selfhost --switch-rounds 1)
  GPT_ARGS=(--preset shakespeare-char)  # nanoGPT's shakespeare-char: val loss ~1.47
  MNIST_ARGS=(--epochs 5)
  PYTEST_ARGS=(-m gpu -q)
fi

step() {  # step NAME COMMAND...: run it, log it, note its time and status in the report
  local name=$1; shift
  local log="$LOGS/$name.log" t0 rc
  t0=$(date +%s)
  echo "== $name: $*" >&2
  "$@" >"$log" 2>&1
  rc=$?
  # shellcheck disable=SC2016  # the backticks are Markdown, not a command
  printf '| %s | %s | %ss | `%s` |\n' "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED ($rc)")" \
    "$(( $(date +%s) - t0 ))" "$*" >>"$LOGS/steps.md"
  [ $rc = 0 ] || FAILED+=("$name")
  return $rc
}

: >"$LOGS/steps.md"
if [ "$DRY" = 0 ] && ! command -v nvidia-smi >/dev/null; then
  echo "bench/gpu.sh: no nvidia-smi here; use --dry-run to check the script on the CPU" >&2
  exit 2
fi
step setup bash .ci/setup
if [ "$DRY" = 0 ]; then
  step cuda-build "$PY" -c "import llama_cpp, torch, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() and torch.cuda.is_available() else 1)"
fi
step tests "$PY" -m pytest "${PYTEST_ARGS[@]}"
MODEL=$("$PY" -c "from selfhost.models.resolve import resolve_model; print(resolve_model(None).path)")
step chat "$PY" bench/chat.py --model "$MODEL" --gpu-layers "$LAYERS" "${CHAT_ARGS[@]}"
step chat-offload "$PY" -m selfhost chat "$MODEL" -p "What is the capital of France?" --json --no-log \
  --gpu-layers "$LAYERS" -t 0 -n 24
step speedups "$PY" bench/chat.py --model "$MODEL" --gpu-layers "$LAYERS" "${SPEED_ARGS[@]}"
step serve "$PY" bench/serve.py --model "$MODEL" "${SERVE_ARGS[@]}" \
  --variant "ngram=--spec ngram" --variant "kv-q8_0=--cache-type-k q8_0 --cache-type-v q8_0 --flash-attn on"
if [ -n "$DATA" ]; then
  RUNS=$(mktemp -d)
  step train-gpt "$PY" -m selfhost train gpt --data "$DATA/tinyshakespeare" --device "$DEVICE" \
    --out "$RUNS/gpt" --no-export --json "${GPT_ARGS[@]}"
  step train-mnist "$PY" -m selfhost train mnist --data "$DATA/mnist" --device "$DEVICE" \
    --out "$RUNS/mnist" --json "${MNIST_ARGS[@]}"
else
  echo "bench/gpu.sh: no data folder with tinyshakespeare/ and mnist/ (--data DIR): training skipped" >&2
  FAILED+=("training: no data")
fi

report() {  # the one report: device, versions, every step, the figures from each log
  echo "# selfhost GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  [ "$DRY" = 1 ] && echo "**Dry run on the CPU with tiny sizes: these figures are not GPU figures.**" && echo
  echo "## Device and versions"
  echo '```'
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
  else
    echo "no nvidia-smi"
  fi
  "$PY" - <<'PYEOF'
import platform
import llama_cpp
import torch
from selfhost.runtime.llama_backend import backend_info
b = backend_info()
print(f"python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__} ({b.name}, offload {b.gpu_offload})")
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}")
PYEOF
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo '```'
  echo
  echo "## Steps ($(( $(date +%s) - START ))s in all)"
  echo
  echo "| step | status | time | command |"
  echo "|---|---|---|---|"
  cat "$LOGS/steps.md"
  for name in chat chat-offload speedups serve train-gpt train-mnist tests; do
    [ -f "$LOGS/$name.log" ] || continue
    echo
    echo "## $name"
    echo '```'
    tail -n 40 "$LOGS/$name.log"
    echo '```'
  done
  if [ -f "$LOGS/train-gpt.log" ]; then
    echo
    "$PY" - "$LOGS/train-gpt.log" <<'PYEOF'
import json, sys
text = open(sys.argv[1]).read()
start = text.find("\n{") + 1  # the JSON result starts a line; sample text may hold braces
try:
    data = json.loads(text[start:text.rfind("}") + 1])
except ValueError:
    print("train-gpt: no JSON result")
else:
    def find(d, key):  # the first value of `key` anywhere in the result
        if isinstance(d, dict):
            if key in d:
                return d[key]
            for v in d.values():
                if (found := find(v, key)) is not None:
                    return found
        return None

    loss = find(data, "best_val_loss") or find(data, "val_loss")
    verdict = "reached" if loss is not None and loss <= 1.47 else "NOT reached"
    print(f"shakespeare-char val loss {loss} after {find(data, 'step')} steps in {find(data, 'elapsed_s')}s: 1.47 {verdict}")
PYEOF
  fi
}
report >"$OUT"
echo "report: $OUT (logs in $LOGS/)" >&2
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed steps: ${FAILED[*]}" >&2
  exit 1
fi
