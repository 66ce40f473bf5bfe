#!/usr/bin/env bash
# Every GPU figure of benchmarks/README.md in one call (about 8 minutes on an H100), JSON files into
# the folder given. Needs PyTorch and torchvision only (no Ray, no MLflow, no data download):
#   bash benchmarks/gpu_suite.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?give the folder for the JSON results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
run() {
  echo "== python $*"
  timeout 300 python "$@" || echo "FAILED (exit $?): python $*"
}
real="--device cuda --data shapes --train-size 50000 --workers 8"
fast="--batch-size 512 --precision bf16 --channels-last"
# ConvNet-3: baseline, engine and compiled engine in one run
run benchmarks/engine.py --model convnet3 $real --epochs 3 $fast --compile --out "$out/engine_convnet3.json"
run benchmarks/engine.py --model resnet18_bn $real --epochs 2 $fast --out "$out/engine_resnet18.json"
run benchmarks/stacked.py --device cuda --precision bf16 --channels-last --copies 2 4 8 --epochs 20 \
    --compile --compile-mode reduce-overhead \
    --out "$out/stacked.json"
run benchmarks/packing.py --device cuda --procs 1 2 4 8 --precision bf16 --channels-last --epochs 30 \
    --out "$out/packing.json"
run benchmarks/imp_round.py --device cuda --precision bf16 --channels-last --distilled-epochs 300 \
    --real-epochs 3 --workers 8 --out "$out/imp_round.json"
# one chain's training over data-parallel workers: N above the GPUs present is skipped (N=1 against
# plain train() still gives the data-parallel path's own overhead on a one-GPU machine)
run benchmarks/data_parallel.py --device cuda --model resnet18_bn --image-size 32 --batch-size 512 \
    --precision bf16 --channels-last --workers 1 2 4 8 --out "$out/data_parallel_resnet18.json"
run benchmarks/data_parallel.py --device cuda --model resnet50_bn --image-size 224 --classes 1000 --train-size 16384 \
    --batch-size 256 --precision bf16 --channels-last --stream on --loader-workers 4 --workers 1 2 4 8 \
    --out "$out/data_parallel_resnet50_streamed.json"
# python benchmarks/idc_distiller.py --dataset cifar10 --root /abs/cifar --device cuda --out "$out/idc_distiller.json"  # needs CIFAR-10 at /abs/cifar; hours (IDC's full budget), so outside run's timeout
