#!/usr/bin/env bash
# The GPU tables of docs/speed.md in one run: msign accuracy per ns_dtype,
# then step time against AdamW and keras.optimizers.Muon, on JAX, torch
# (eager, multi-tensor update) and TensorFlow (XLA, and without XLA where
# benchmarks/step_time.py offers --no-jit-compile), at d = 2048 and 1024
# with keras_muon's Newton–Schulz in bfloat16 and in float32.
#
#     bash benchmarks/gpu_tables.sh [folder]      # folder: default $OUT, else ./gpu_tables
#
# Every table goes to the folder: <run>.txt (what the run printed) and
# <run>/step_time_<backend>.json, with machine.txt and timings.txt. The
# whole run stops after BUDGET seconds (default 480); each step-time run
# gets at most RUN_LIMIT seconds (default 110), and the runs go in order of
# importance (bfloat16 first, the goal being 1.10× AdamW at d = 2048; the
# widest width first within a run), so a cut loses the least. A run that
# fails or is cut is logged and the next one starts. Sizes can be shrunk
# for a smoke test on a CPU, e.g.
#
#     WIDTHS="64" ROUNDS=2 STEPS=1 SEQUENCE_LENGTH=32 BATCH_SIZE=4 \
#         SHAPE="32 96" MATRICES=1 bash benchmarks/gpu_tables.sh /tmp/tables
set -uo pipefail
cd "$(dirname "$0")/.."

folder=${1:-${OUT:-gpu_tables}}
python=${PYTHON:-python}
widths=${WIDTHS:-2048 1024}
rounds=${ROUNDS:-3}
steps=${STEPS:-2}
sequence_length=${SEQUENCE_LENGTH:-512}
batch_size=${BATCH_SIZE:-32}
shape=${SHAPE:-256 1024}
matrices=${MATRICES:-2}
run_limit=${RUN_LIMIT:-110}
deadline=$((SECONDS + ${BUDGET:-480}))
mkdir -p "$folder"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    for module in keras jax tensorflow torch; do
        "$python" -c "import $module; print('$module', $module.__version__)"
    done
} >"$folder/machine.txt" 2>/dev/null

# run NAME LIMIT BACKEND COMMAND...: COMMAND with KERAS_BACKEND=BACKEND,
# cut at LIMIT seconds or at the deadline, whichever comes first.
run() {
    local name=$1 limit=$2 backend=$3
    shift 3
    local left=$((deadline - SECONDS))
    if ((left < 10)); then
        echo "$name: skipped, out of time" | tee -a "$folder/timings.txt"
        return
    fi
    ((limit > left)) && limit=$left
    local start=$SECONDS
    # Unbuffered, so that a cut run keeps the tables it printed.
    KERAS_BACKEND=$backend PYTHONUNBUFFERED=1 timeout --kill-after=10 "$limit" "$@" \
        >"$folder/$name.txt" 2>"$folder/$name.log"
    local status=$?
    local outcome="ok"
    ((status == 124)) && outcome="cut at $limit s"
    ((status != 0 && status != 124)) && outcome="failed ($status, see $name.log)"
    echo "$name: $((SECONDS - start)) s, $outcome" | tee -a "$folder/timings.txt"
}

for backend in jax torch tensorflow; do
    # shellcheck disable=SC2086  # $shape is two numbers
    run "msign_accuracy_$backend" 60 "$backend" "$python" benchmarks/msign_accuracy.py \
        --shape $shape --matrices "$matrices" --schedules polar_express \
        --ns-dtype float32 tf32 bfloat16 float16
done

if "$python" benchmarks/step_time.py --help | grep -q -- --no-jit-compile; then
    tensorflow_without_xla=(--no-jit-compile)
else
    # On a GPU, Keras's jit_compile="auto" is XLA on TensorFlow.
    tensorflow_without_xla=()
    echo "tensorflow without XLA: skipped, step_time.py has no --no-jit-compile" |
        tee -a "$folder/timings.txt"
fi

# step NAME BACKEND NS_DTYPE OPTIMIZERS [FLAGS...]: one step_time.py run.
step() {
    local name=$1 backend=$2 ns_dtype=$3 optimizers=$4
    shift 4
    # shellcheck disable=SC2086  # $widths and $optimizers are lists
    run "$name" "$run_limit" "$backend" "$python" benchmarks/step_time.py \
        --backend "$backend" --widths $widths --rounds "$rounds" --steps "$steps" \
        --sequence-length "$sequence_length" --batch-size "$batch_size" \
        --ns-dtype "$ns_dtype" --optimizers $optimizers --output "$folder/$name" "$@"
}

both="keras_muon.Muon keras.optimizers.Muon"
# keras.optimizers.Muon does not depend on ns_dtype: measured once, with
# bfloat16 keras_muon; AdamW is measured in every run.
step step_time_jax_bfloat16 jax bfloat16 "$both"
step step_time_torch_bfloat16 torch bfloat16 "$both"
step step_time_tensorflow_xla_bfloat16 tensorflow bfloat16 "$both" --jit-compile
step step_time_jax_float32 jax float32 keras_muon.Muon
step step_time_torch_float32 torch float32 keras_muon.Muon
step step_time_tensorflow_xla_float32 tensorflow float32 keras_muon.Muon --jit-compile
if ((${#tensorflow_without_xla[@]})); then
    step step_time_tensorflow_bfloat16 tensorflow bfloat16 "$both" "${tensorflow_without_xla[@]}"
    step step_time_tensorflow_float32 tensorflow float32 keras_muon.Muon "${tensorflow_without_xla[@]}"
fi
echo "tables in $folder, $SECONDS s in all" | tee -a "$folder/timings.txt"
