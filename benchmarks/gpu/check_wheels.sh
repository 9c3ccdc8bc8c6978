#!/usr/bin/env bash
# CPU stand-in for the GPU machine: a fresh virtualenv holding only torch and the image's packages
# (benchmarks/gpu/device_image.txt), plus .whl/ installed the way benchmarks/gpu/session.sh installs it there.
# Then every module the device stages import is imported, and the lm-eval peer, a 2-rank deepy.py run, generation
# from its checkpoint and the recipe stage's script (--smoke) go through it on the CPU.
# Run after `make gpu-wheels`:  make gpu-wheels-check   (~3 min; needs the index)
# The stand-in's Python is this machine's (3.11 here, 3.12 there): for the few compiled wheels in .whl/ it
# installs the same versions built for its own Python, so what is checked is that nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${GPU_MIMIC_VENV:-/tmp/gpu_mimic}
site=$venv/site
torch_pin=$(sed -n 's/^PINS *:= *\(torch==[^ ]*\).*/\1/p' Makefile)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$torch_pin" -r benchmarks/gpu/device_image.txt
fi
rm -rf "$site" && mkdir -p "$site"
tag=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheels=()
for w in .whl/*.whl; do
  case "$w" in
    *-cp3*-cp3*|*-py3[0-9]*-none-*) # compiled for the GPU machine's Python: the same version for this one
      name=$(basename "$w" | cut -d- -f1); version=$(basename "$w" | cut -d- -f2)
      "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$site.tmp" \
        "$name==$version"
      wheels+=("$site.tmp/$(ls "$site.tmp" | grep -i "^${name}-${version}-" | head -1)") ;;
    *) wheels+=("$w") ;;
  esac
done
"$venv/bin/pip" install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$site" "${wheels[@]}"
rm -rf "$site.tmp"
export PYTHONPATH=$site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
py="$venv/bin/python"
echo "== imports"
"$py" - <<'PY'
import importlib
mods = ["deepspeed", "megatron.core.tensor_parallel", "megatron.core.parallel_state", "pydantic", "ftfy",
        "llama_models.llama3.chat_format", "torchao.float8", "lm_eval", "lm_eval.models.huggingface",
        "datasets", "evaluate", "transformers", "megatron.trainer", "megatron.model.fp8", "megatron.eval.next_token",
        "megatron.generation.engine", "megatron.planning", "tools.eval.harness"]
for m in mods:
    importlib.import_module(m)
    print("  ok", m)
PY
echo "== lm-eval peer (benchmarks/mcq_speed.py, tiny shape, CPU)"
"$py" benchmarks/mcq_speed.py --shape tiny --questions 8 --batch-size 4 --device cpu --no-report --full-pass 16 \
  --max-new-tokens 4 | tail -9
echo "== deepy.py train.py: 2 ranks over gloo, pipeline 2, a checkpoint, then tools/generate.py from that checkpoint"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" tools/datasets/build_demo_corpus.py --output "$work/docs.jsonl" --target-mb 0.3 >/dev/null
"$py" tools/datasets/preprocess_data.py --input "$work/docs.jsonl" --output-prefix "$work/docs" --append-eod \
  --workers 1 --no-progress >/dev/null
cat > "$work/run.yml" <<YML
data_path: $work/docs_text_document
train_iters: 4
eval_interval: 4
log_interval: 2
use_wandb: false
run_dir: $work/run
tensorboard_dir: $work/run/tb
save: $work/ckpt
checkpoint_factor: 4
YML
"$py" deepy.py train.py configs/tiny_cpu.yml configs/demo.yml "$work/run.yml" > "$work/train.log" 2>&1 \
  || { tail -30 "$work/train.log"; exit 1; }
grep -E "iteration +4|saved" "$work/train.log" | tail -2
"$py" tools/generate.py --model "$work/ckpt" --prompt "def main" --max-new-tokens 8 --device cpu | tail -2
echo "== the recipe stage's script on the CPU (benchmarks/recipe_1b_speed.py --smoke: the tiny shape)"
"$py" benchmarks/recipe_1b_speed.py --smoke --steps 3 --work "$work/recipe" | tail -3
bash -n benchmarks/gpu/session.sh
echo "stand-in OK: nothing the device stages import is missing from .whl/"
