#!/usr/bin/env bash
# The one-call GPU check: on a CUDA machine, in under 8 minutes on one GPU (compile included),
#   bash gpu_check.sh [report.md]
# 1. the CUDA-only tests (pytest -m cuda: both official references on CUDA, bf16, channels-last,
#    --grad_checkpoint memory, fp16 with the grad scaler),
# 2. torchrun --nproc_per_node 1 (NCCL) on a small synthetic CIFAR-10 folder: stop at a step, resume,
# 3. bench.py training steps of `cifar10`, then `attentive_cifar10`: fp32 eager, fp32 with
#    --grad_checkpoint, bf16 + compile + channels-last (images/s, peak memory, MFU, the loss against fp32).
# The report (default gpu_check.md) grows as each part ends, and the same lines go to stdout, so a run
# stopped early keeps what it had; each part says how long it took. The tests read the official
# fixtures from $HVAE_DATA/reference (default ../shared/data). PYTHON picks the interpreter (default
# python3). HVAE_GPU_CHECK_CPU=1 runs the same steps at toy sizes on the CPU (gloo, no compile):
# tests/test_bench.py does, so the script stays working.
set -uo pipefail
report=$(realpath -m "${1:-$(dirname "$0")/gpu_check.md}")   # a path given is the caller's, not the repo's
cd "$(dirname "$0")"
py=${PYTHON:-python3}
command -v "$py" > /dev/null || { echo "gpu_check.sh: no $py here (set PYTHON)" >&2; exit 1; }
: > "$report" || { echo "gpu_check.sh: cannot write the report $report" >&2; exit 1; }   # before any work
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed() { echo "$1" >> "$work/failed"; }   # the parts run in a pipeline's subshell: a file carries this out
if [ -n "${HVAE_GPU_CHECK_CPU:-}" ]; then
  presets=(cpu) bench=(--batch_size 2 --modes fp32 fp32+ckpt --steps 1 --warmup 0 --device cpu)
  run=(--preset cpu --batch_size 4 --width 16 --zdim 4 --num_mixtures 2 --device cpu) stop=2
else
  presets=(cifar10 attentive_cifar10) bench=(--batch_size 16 --modes fp32 fp32+ckpt bf16+compile+cl --steps 10 --warmup 3)
  run=(--preset cpu --batch_size 32) stop=50
fi
took() { echo; echo "($1: $((SECONDS - $2)) s)"; echo; }

{
  echo "# GPU check, $(date -u +%F)"
  echo
  "$py" -c "import torch; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU: CPU'; print(f'torch {torch.__version__}, {d}')"
  echo
  t=$SECONDS
  echo "## CUDA-only tests"
  echo
  echo '```'
  "$py" -m pytest -q -m cuda tests/test_cuda.py -rs > "$work/tests.log" 2>&1 || failed tests
  tail -12 "$work/tests.log"
  echo '```'
  took tests $t
  t=$SECONDS
  echo "## torchrun --nproc_per_node 1: stop at step $stop, resume to $((2 * stop))"
  echo
  # a synthetic CIFAR-10 folder in the official format (the GPU machine may have no data)
  "$py" - "$work/data" <<'PY'
import os, pickle, sys
import numpy as np
folder = os.path.join(sys.argv[1], 'cifar-10-batches-py')
os.makedirs(folder)
rng = np.random.RandomState(0)
for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    with open(os.path.join(folder, name), 'wb') as f:
        pickle.dump({'data': rng.randint(0, 256, (200, 3072), dtype=np.uint8), 'labels': [0] * 200}, f, protocol=2)
PY
  common=("${run[@]}" --data_root "$work/data" --no_download --out_dir "$work/out" --log_every "$stop")
  torchrun=("$py" -m torch.distributed.run --standalone --nproc_per_node 1 train.py "${common[@]}")
  echo '```'
  train() {   # one run's key lines; the end of its output where it failed
    if "${torchrun[@]}" --max_steps "$@" > "$work/run.log" 2>&1; then
      grep -E "^model|resumed|^step $1 |saved" "$work/run.log" | head -5
    else
      failed "torchrun $*"   # the worker's own error line(s), not torchrun's summary
      grep -E "(Error|Exception|^error):" "$work/run.log" | grep -v ChildFailedError | tail -3 || tail -5 "$work/run.log"
    fi
  }
  train "$stop"
  train $((2 * stop)) --resume
  echo '```'
  took torchrun $t
  for preset in "${presets[@]}"; do   # one bench run per preset: the first preset's rows survive a stop in the second
    t=$SECONDS
    echo "## Training steps (bench.py --presets $preset ${bench[*]})"
    echo
    "$py" bench.py --presets "$preset" "${bench[@]}" 2>&1 || failed "bench $preset"
    took "bench $preset" $t
  done
  [ -s "$work/failed" ] && echo "**failed:** $(paste -sd, "$work/failed")" || echo "every part ran"
} 2>&1 | tee "$report"
[ ! -s "$work/failed" ]   # the exit status: 0 only when every part ran
