#!/usr/bin/env bash
# Every outstanding GPU check in one prepared device call (the device tool gives a session ~15 minutes in all and
# 10 minutes a call). From the project root on the GPU machine, with .whl carried (make gpu-wheels, here):
#
#   bash benchmarks/gpu/session.sh [STAGE ...]        (run: timeout_s 600, carry [".whl"])
#
# Stages, run in the order given (default: tests fp8 loss), each under its own cap and skipped when less than
# its minimum is left of BUDGET_S (default 560 s from the start):
#   tests    make test-gpu: tests_gpu/ (kernels, SDPA backends, FP8 vs torchao, generation on CUDA)  cap 240
#   fp8      8B-width 4 layers: bf16 fast-fusedgrad vs FP8 tensorwise/rowwise, same call (issue 23)  cap 330
#   loss     1B shape, 300 steps of real-token CPT, bf16 then FP8 from the same seed (issue 23)      cap 330
#   mcq      8B shape: next-token vs lm-eval on 500 questions, then the tool over 4,425 (issue 20)   cap 420
#   gen      1B shape: transformers vs vLLM greedy and tokens/s, checkpoint = HF (issue 19)          cap 240
#   recipe   configs/recipe 1B CPT config's tokens/s (issue 24)                                       cap 300
#   profile  8B-width FP8 run with torch.profiler over steps 5-6: its top kernels (what limits FP8)   cap 200
# A second call takes the rest, e.g.  bash benchmarks/gpu/session.sh mcq gen recipe
# Everything lands in $OUT (at most 8 files come back): session.log (all output, a table last) and one JSON
# per stage (+ loss_steps.tgz, the per-step losses). Merge and record here afterwards:
#   python benchmarks/train_throughput.py --report-from fp8_8b.json --report --record-memory
#   python benchmarks/generation_backends.py --report-from gen_1b.json
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
main() {  # everything below, its output also in $OUT/session.log (tee, after the function)
BUDGET_S=${BUDGET_S:-560}
START=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

WHEELS=${GPU_WHEELS:-.whl}  # (tests point it elsewhere: .whl's wheels are for the GPU machine's Python)
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl \
    || { echo "error: installing .whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "note: no .whl here (make gpu-wheels, then carry .whl): using what is installed"
  export PYTHONPATH=$PWD
fi
# DeepSpeed's op builder cannot parse the image's "9.0a"; HF and lm-eval must not reach for the network.
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi here"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

declare -a SUMMARY
stage() {  # stage NAME CAP MIN COMMAND...: run COMMAND under min(CAP, what is left), note the outcome
  local name=$1 cap=$2 min=$3; shift 3
  local avail; avail=$(left)
  if [ "$avail" -lt "$min" ]; then
    SUMMARY+=("$name|skipped: ${avail}s left < ${min}s|0"); echo "== $name: skipped (${avail}s left)"; return
  fi
  local t=$(( avail < cap ? avail : cap )) t0; t0=$(date +%s)
  echo "== $name (up to ${t}s): $*"
  timeout --kill-after=10 "$t" "$@"
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  SUMMARY+=("$name|$([ $rc -eq 0 ] && echo ok || { [ $rc -eq 124 ] && echo "timed out" || echo "exit $rc"; })|$took")
}

run_stage() {
  case "$1" in
    tests) stage tests 240 60 python3 -m pytest -q -p no:cacheprovider tests_gpu ;;
    fp8) stage fp8 330 150 python3 benchmarks/train_throughput.py --shapes 8b-4l --no-peer --skip-gpu-tests \
           --variants fast-fusedgrad,fast-fusedgrad-fp8,fast-fusedgrad-fp8-rowwise --json "$OUT/fp8_8b.json" \
           --deadline $(( $(left) < 330 ? $(left) - 5 : 325 )) --work /tmp/throughput ;;
    loss)
      # 300 steps of 2,048 tokens (~0.6M tokens: about one pass over the Python-docs corpus, all there is), lr
      # that moves the loss; the same seed, data and init for both (docs/fp8.md)
      local extra='{"seq_length": 2048, "gradient_accumulation_steps": 1, "optimizer": {"type": "Adam",
        "params": {"lr": 3.0e-4}}, "warmup": 0.02, "lr_decay_style": "cosine", "min_lr": 3.0e-5}'
      stage loss 330 200 python3 benchmarks/train_throughput.py --shapes 1b --no-peer --skip-gpu-tests --steps 300 \
        --variants fast-fusedgrad,fast-fusedgrad-fp8 --extra "$extra" --json "$OUT/loss_1b.json" \
        --deadline $(( $(left) < 330 ? $(left) - 5 : 325 )) --work /tmp/throughput --min-run-s 60
      tar czf "$OUT/loss_steps.tgz" -C /tmp/throughput ours_1b_fast-fusedgrad/metrics.jsonl \
        ours_1b_fast-fusedgrad-fp8/metrics.jsonl 2>/dev/null || true ;;
    mcq) stage mcq 420 180 python3 benchmarks/mcq_speed.py --shape 8b --device cuda --questions 500 --batch-size 32 \
           --full-pass 4425 --max-new-tokens 32 --no-report --json "$OUT/mcq_8b.json" ;;
    gen) stage gen 240 90 python3 benchmarks/generation_backends.py --device cuda --no-report \
           --json "$OUT/gen_1b.json" ;;
    recipe) stage recipe 300 120 python3 benchmarks/recipe_1b_speed.py --steps 8 --work /tmp/recipe_1b \
              --json "$OUT/recipe_1b.json" ;;
    profile)
      stage profile 200 120 python3 benchmarks/train_throughput.py --shapes 8b-4l --no-peer --skip-gpu-tests \
        --steps 7 --variants fast-fusedgrad-fp8 --extra '{"profile": true, "profile_step_start": 5,
        "profile_step_stop": 6}' --json "$OUT/profile_fp8.json" --work /tmp/throughput_profile \
        --deadline $(( $(left) < 200 ? $(left) - 5 : 195 ))
      cp /tmp/throughput_profile/ours_8b-4l_fast-fusedgrad-fp8/profile/top_kernels_rank0.txt \
        "$OUT/top_kernels_fp8.txt" 2>/dev/null || true ;;
    *) echo "unknown stage $1 (tests fp8 loss mcq gen recipe profile)"; SUMMARY+=("$1|unknown stage|0") ;;
  esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests fp8 loss)
for s in "${stages[@]}"; do run_stage "$s"; done

echo
echo "| stage | outcome | seconds |"
echo "|---|---|---:|"
for row in "${SUMMARY[@]}"; do echo "| ${row//|/ | } |"; done
echo "total $(( $(date +%s) - START )) s; files in \$OUT:"; ls -la "$OUT"
  # the call's exit status: 1 if a stage failed or timed out (a skipped stage is named above, not a failure)
  for row in "${SUMMARY[@]}"; do case "$row" in *"|ok|"*|*"|skipped"*) ;; *) return 1 ;; esac; done
}

main "$@" 2>&1 | tee -a "$OUT/session.log"
