#!/usr/bin/env bash
# The GPU check: on a CUDA machine, in under 8 minutes, run
#   test_cuda      tests/test_cuda.py (fused Adam, 16-mixed, FSDP1 refused, no host-device sync in a predicted step
#                  under torch.cuda.set_sync_debug_mode("error"), compile=True on CUDA)
#   calls          python -m benchmarks.overhead calls on CUDA: ATen calls and kernel launches per predict()+restore()
#                  for every rule family at 40/400/4000 tensors, transient memory, the unused-module case
#   overhead       python -m benchmarks.overhead steps on CUDA: the optimizer-bound MLP with AdamW foreach, AdamW
#                  fused and SGD momentum, each with XGradCallback, XGradCallback(compile=True) and the naive XGrad
#   overhead-bf16  the same under precision="bf16-mixed" (AdamW foreach, SGD momentum)
# and write every log and result, the machine's nvidia-smi and the versions into one folder, printed at the end.
#
#   benchmarks/gpu_check.sh [--cpu] [--archive FILE] [FOLDER]     (or: make gpu-check [GPU_CHECK_ARGS="..."])
#
# FOLDER defaults to benchmarks/runs/gpu-<timestamp> (git-ignored). --cpu is a dry run: every stage on the CPU with
# tiny sizes, to check the script and the folder it writes. --archive also packs the folder into FILE (.tar.gz), for
# machines from which few files can be copied back.
#
# It installs nothing. Python: $PYTHON if set, else the repository's .venv, else python3, whichever first imports
# torch (and, without --cpu, sees a CUDA device); this checkout is put first on PYTHONPATH, so the package need not be
# installed. Without a CUDA device it stops at once with a message. A stage that fails or runs past its time limit
# is recorded in summary.md and stages.tsv and the next one runs; the exit status is 0 only if every stage passed.
# Time limits (seconds) can be changed with GPU_CHECK_TIMEOUT_<STAGE> (ENV, TEST_CUDA, CALLS, OVERHEAD,
# OVERHEAD_BF16) and GPU_CHECK_TOTAL (the whole run, default 460).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
ARCHIVE=""
OUT=""
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
while (($#)); do
    case "$1" in
        --cpu | --dry-run) MODE=cpu ;;
        --archive)
            [[ $# -ge 2 ]] || { echo "gpu_check: --archive needs a file name" >&2; exit 2; }
            ARCHIVE="$2"
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *)
            [[ -z "$OUT" ]] || { echo "gpu_check: one output folder only, got $OUT and $1" >&2; exit 2; }
            OUT="$1"
            ;;
    esac
    shift
done

# ---------------------------------------------------------------- the Python to use
candidates=()
if [[ -n "${PYTHON:-}" ]]; then
    candidates=("$PYTHON")
else
    [[ -x "$REPO/.venv/bin/python" ]] && candidates+=("$REPO/.venv/bin/python")
    candidates+=(python3 python)
fi
if [[ $MODE == gpu ]]; then
    probe='import sys, torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, '\
'cuda available {torch.cuda.is_available()}"); sys.exit(0 if torch.cuda.is_available() else 1)'
else
    probe='import torch; print(f"torch {torch.__version__}")'
fi
PY=""
tried=""
for candidate in "${candidates[@]}"; do
    command -v "$candidate" > /dev/null 2>&1 || { tried+="  $candidate: not found"$'\n'; continue; }
    if said="$("$candidate" -c "$probe" 2>&1)"; then
        PY="$candidate"
        break
    fi
    tried+="  $candidate: $(tail -n 1 <<< "$said")"$'\n'
done
if [[ -z "$PY" ]]; then
    if [[ $MODE == gpu ]]; then
        echo "gpu_check: no CUDA device: no Python here has a torch that sees one." >&2
    else
        echo "gpu_check: no Python here imports torch." >&2
    fi
    printf '%s' "$tried" >&2
    echo "Run it on a machine with a CUDA GPU and torch's CUDA build (or set PYTHON=/path/to/python);" \
        "benchmarks/gpu_check.sh --cpu is a dry run on the CPU." >&2
    exit 2
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
missing="$("$PY" -c '
import importlib.util
names = {"lightning": "lightning", "pytest": "pytest", "tqdm": "tqdm", "matplotlib": "matplotlib", "yaml": "PyYAML"}
print(" ".join(pip for module, pip in names.items() if importlib.util.find_spec(module) is None))')"
if [[ -n "$missing" ]]; then
    echo "gpu_check: $PY lacks: $missing. Install them next to its torch (pip install $missing, or" \
        "pip install -e '.[dev]' with the torch already there), then run again." >&2
    exit 3
fi

# ---------------------------------------------------------------- sizes and time limits
if [[ $MODE == gpu ]]; then
    DEVICE=cuda
    CALLS_ARGS=(--calls-repeats 3)
    STEP_ARGS=(--runs 1 --steps 20 --warmup 6)
    OVERHEAD_CASES=(mlp-adamw mlp-adamw_fused mlp-sgd)
    BF16_CASES=(mlp-adamw mlp-sgd)
    VARIANT_ARGS=()
else  # tiny: the script and the folder layout, in seconds
    DEVICE=cpu
    CALLS_ARGS=(--calls-sizes 4 8 --calls-rules "SGD momentum" AdamW --calls-repeats 1 --calls-unused-tensors 8)
    STEP_ARGS=(--runs 1 --steps 2 --warmup 4)
    OVERHEAD_CASES=(mlp-sgd)
    BF16_CASES=(mlp-sgd)
    VARIANT_ARGS=(--variants xgrad)
fi
TOTAL="${GPU_CHECK_TOTAL:-460}"
OUT="${OUT:-$REPO/benchmarks/runs/gpu-$([[ $MODE == cpu ]] && echo dry-run-)$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
START=$SECONDS
printf 'stage\tstatus\texit\tseconds\tlog\n' > "$OUT/stages.tsv"
failures=0

# run_stage NAME DEFAULT_TIMEOUT COMMAND...: the command's output goes to NAME.log; its status to stages.tsv
run_stage() {
    local name="$1" limit="$2"
    shift 2
    local variable
    variable="GPU_CHECK_TIMEOUT_$(tr 'a-z-' 'A-Z_' <<< "$name")"
    limit="${!variable:-$limit}"
    local left=$((TOTAL - (SECONDS - START) - 5))
    ((limit <= left)) || limit=$left
    local status rc=0 began=$SECONDS
    if ((limit < 1)); then
        status=skipped
        rc=-1
        echo "no time left in the ${TOTAL} s of the whole check" > "$OUT/$name.log"
    else
        echo "[gpu-check] $name: running (at most ${limit} s)"
        timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
        case $rc in
            0) status=ok ;;
            124 | 137) status=timeout ;;
            *) status=failed ;;
        esac
    fi
    [[ $status == ok ]] || failures=$((failures + 1))
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - began))" "$name.log" >> "$OUT/stages.tsv"
    echo "[gpu-check] $name: $status ($((SECONDS - began)) s, log $OUT/$name.log)"
}

# ---------------------------------------------------------------- the stages
# the versions and the machine (into env.log, which the summary quotes) and nvidia-smi's report (nvidia-smi.txt)
MACHINE='
import os, platform, shutil, subprocess, sys
from importlib.metadata import PackageNotFoundError, version
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for package in ("lightning", "triton"):
    try:
        print(package, version(package))
    except PackageNotFoundError:
        print(package, "not installed")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i}:", p.name, f"capability {p.major}.{p.minor}", f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("device: no CUDA device (a dry run on the CPU)")
print("cpu:", platform.machine(), os.cpu_count(), "cores")
git = shutil.which("git")
head = git and subprocess.run([git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = git and subprocess.run([git, "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
print("commit", head or "unknown", "(with uncommitted changes)" if dirty else "")
smi = shutil.which("nvidia-smi")
ran = smi and subprocess.run([smi], capture_output=True, text=True)
report = ran.stdout + ran.stderr if ran else "nvidia-smi: not on this machine\n"
with open(os.path.join(sys.argv[1], "nvidia-smi.txt"), "w") as file:
    file.write(report)
'
run_stage env 30 "$PY" -c "$MACHINE" "$OUT"
run_stage test_cuda 150 "$PY" -m pytest tests/test_cuda.py -q -rA -p no:cacheprovider --junitxml="$OUT/test_cuda.xml"
run_stage calls 120 "$PY" -m benchmarks.overhead calls --device "$DEVICE" "${CALLS_ARGS[@]}" \
    --out "$OUT" --name calls
run_stage overhead 100 "$PY" -m benchmarks.overhead steps --device "$DEVICE" --cases "${OVERHEAD_CASES[@]}" \
    ${VARIANT_ARGS[@]+"${VARIANT_ARGS[@]}"} "${STEP_ARGS[@]}" --out "$OUT" --name overhead
run_stage overhead-bf16 60 "$PY" -m benchmarks.overhead steps --device "$DEVICE" --precision bf16-mixed \
    --cases "${BF16_CASES[@]}" ${VARIANT_ARGS[@]+"${VARIANT_ARGS[@]}"} "${STEP_ARGS[@]}" --out "$OUT" \
    --name overhead-bf16

# ---------------------------------------------------------------- the summary
{
    echo "# GPU check ($MODE mode)"
    echo
    echo "\`benchmarks/gpu_check.sh\` on ${HOSTNAME:-an unnamed machine}, $(date '+%Y-%m-%d %H:%M:%S %Z'); $((SECONDS - START)) s in all."
    echo
    echo '```'
    cat "$OUT/env.log"
    echo '```'
    echo
    echo "| stage | status | exit | seconds | log |"
    echo "|---|---|---|---|---|"
    tail -n +2 "$OUT/stages.tsv" | while IFS=$'\t' read -r name status rc seconds log; do
        echo "| $name | $status | $rc | $seconds | [$log]($log) |"
    done
    for result in calls overhead overhead-bf16; do
        if [[ -f "$OUT/$result.md" ]]; then
            echo
            sed 's/^#/##/' "$OUT/$result.md"  # its own headings, one level down
        fi
    done
} > "$OUT/summary.md"
if [[ -n "$ARCHIVE" ]]; then
    tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")"
    echo "[gpu-check] archive: $ARCHIVE"
fi
stages=$(($(wc -l < "$OUT/stages.tsv") - 1))
echo "[gpu-check] $((stages - failures)) of $stages stages passed; results in $OUT (summary.md)"
((failures == 0))
