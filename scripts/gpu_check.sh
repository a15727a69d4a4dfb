#!/usr/bin/env bash
# The GPU checks, on a CUDA machine with papo's GPU stack (or at least torch, transformers and
# DeepSpeed): the GPU tests (DeepSpeed on GPU, the cuda_ipc weight transport into a perception
# worker and an HF rollout worker in another process), the device-agnostic learner / rollout /
# modeling unit tests on the GPU, and the weight-sync benchmark. Logs and the benchmark JSON go
# to ${OUT:-gpu-check}/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__, '|', torch.cuda.get_device_name(0))"
rc=0
python3 -m pytest -q -p no:cacheprovider --timeout 240 -rfEs tests/gpu tests/unit/test_weights.py \
    tests/unit/test_learner_unit.py tests/unit/test_rollout_unit.py tests/unit/test_modeling.py 2>&1 | tee "$out/pytest.log" || rc=1
python3 bench/weight_sync.py --out "$out/weight_sync.json" "$@" 2>&1 | tee "$out/weight_sync.log" || rc=1
exit $rc
