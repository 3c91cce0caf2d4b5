#!/usr/bin/env bash
# One short GPU check (under 7 minutes on one H100 / H200, BUDGET_S): the engine, monitor and scale
# benchmarks on CUDA, plus the test suite's CUDA-only tests, with every output kept.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # also write each output to $OUT/*.txt
#
# It installs nothing but the package itself (`pip install --no-deps -e .`, falling back
# to PYTHONPATH): the GPU machine may have no network, so POT, pandas, scipy... must
# already be there (the workplace's H200 image has no POT: carry its wheel, e.g.
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl POT==0.9.7.post1`,
# install it with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and put
# /tmp/site on PYTHONPATH before running this; benchmarks/monitor.py's child processes keep it). A step whose imports fail is skipped with a message saying which
# module is missing; a step that runs past its time cap is stopped (`timeout`), so the
# whole script stays under BUDGET_S seconds.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-420}
PY=${PYTHON:-$(command -v python || command -v python3)}
OUTDIR=${OUT:-}
[ -n "$OUTDIR" ] && mkdir -p "$OUTDIR"
START=$(date +%s)

say() { printf '%s\n' "$*"; [ -n "$OUTDIR" ] && printf '%s\n' "$*" >>"$OUTDIR/summary.txt"; return 0; }

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run NAME CAP_S MODULES -- COMMAND...: skip on missing modules, cap the time, keep output
run() {
    local name=$1 cap=$2 modules=$3
    shift 4
    local missing
    missing=$("$PY" - "$modules" <<'EOF'
import importlib, sys
bad = []
for name in sys.argv[1].split(","):
    try:
        importlib.import_module(name)
    except Exception as err:  # ImportError, or a broken install
        bad.append(f"{name} ({type(err).__name__}: {err})")
print("; ".join(bad))
EOF
)
    if [ -n "$missing" ]; then
        say "SKIP $name: cannot import $missing"
        return 0
    fi
    local budget
    budget=$(left)
    if [ "$budget" -lt 15 ]; then
        say "SKIP $name: out of time (budget ${BUDGET_S}s spent)"
        return 0
    fi
    [ "$cap" -gt "$budget" ] && cap=$budget
    say "=== $name (cap ${cap}s): $*"
    local log=/dev/null
    [ -n "$OUTDIR" ] && log="$OUTDIR/$name.txt"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "=== $name: STOPPED at its ${cap}s cap (partial output above)"
    else
        say "=== $name: exit code $rc after $((SECONDS - t0))s"
    fi
}

# --- the environment -------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) uncommitted file(s)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
try:
    import torch
    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda)
    if cuda:
        print("device 0:", torch.cuda.get_device_name(0))
except Exception as err:
    print("torch import failed:", err)
for name in ("numpy", "scipy", "pandas", "ot", "matplotlib", "pytest", "hypothesis"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"{name} MISSING ({type(err).__name__})")
EOF
} 2>&1 | tee ${OUTDIR:+"$OUTDIR/env.txt"}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "ABORT: torch cannot see a CUDA device; nothing here would run on a GPU"
    exit 1
fi

# --- the package, without touching the network --------------------------------------
if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
    say "note: 'pip install --no-deps -e .' failed; using PYTHONPATH=$PWD instead"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step stopped at its cap keeps the output it printed

# --- the checks, by what the open issues need first -----------------------------------
# CUDA-only tests (skipped on CPU machines): device placement, the sketch on the GPU.
run cuda_tests 60 "pytest,hypothesis,pandas,ot,scipy,ics_toolkit.monitor" -- \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_scale.py tests/test_sketch.py \
    tests/test_blocks.py tests/test_memory_plan.py tests/test_distances.py tests/test_nn.py \
    tests/test_recording.py tests/test_state.py -k "cuda or hadamard or orthonormal or contraction"

# Monitor overhead on a training run on the GPU (issue 11's GPU line): fresh processes.
run monitor 120 "pandas,ot,ics_toolkit.monitor,ics_toolkit.models" -- \
    "$PY" benchmarks/monitor.py --device cuda --rounds 1  # 62 s on an H200; 2 rounds > 130 s

# Real sizes (issue 16): ResNet-50 / ViT-B/16 at 224 with the memory plan, device peak and
# the plan's host offload (needs transformers).
run big_models 150 "transformers,pandas,ot,ics_toolkit.monitor" -- \
    "$PY" benchmarks/big_models.py --device cuda --probe 16 64 --rounds 2 --every 1

# The plan's host offload on a real device: 5% of the free memory is below what the
# captures of ResNet-50 at probe 64 need, so the plan keeps them on the host.
run big_offload 120 "transformers,pandas,ot,ics_toolkit.monitor" -- \
    "$PY" benchmarks/big_models.py --device cuda --model resnet50 --probe 64 --rounds 2 \
    --every 1 --memory-budget 0.05

# The offload's pinned host memory, step by step, against the plan's host_peak.
run pinned_host 60 "transformers,ics_toolkit.monitor" -- \
    "$PY" benchmarks/pinned_host.py

# The sketch: only the kept coordinates against the whole transform, on the GPU.
run sketch_speed 30 "ics_toolkit.sketch" -- \
    "$PY" benchmarks/sketch_speed.py --device cuda --k 64 256 --repeats 3

# Engine: batched sliced W1 vs POT, exact vs POT (the exact solver runs on the CPU).
run engine 60 "numpy,ot,ics_toolkit.distances" -- \
    "$PY" benchmarks/engine.py --device cuda --repeat 3

# Scale: cost of a measured step versus n and d per method, sketch cost, memory per layer.
run scale_quick 45 "pandas,ot,ics_toolkit.monitor" -- \
    "$PY" benchmarks/scale.py --quick --device cuda

say "done in $(($(date +%s) - START))s (budget ${BUDGET_S}s)"
