#!/usr/bin/env bash
# The checks that need a CUDA device, as one short run (about 5 to 8 minutes on one H200):
# the CUDA tests, then issue 20's GPU lines with `flows bench` on synthetic 8-bit 3x32x32
# images: memory-saving / ordinary for Glow at the paper's CIFAR-10 width (3 levels of 32
# steps, hidden 512), the fp16 and bf16 rows with their gradient agreement against float32,
# and the compiled rows. Prints everything; with OUT set (the device tool's $OUT), the
# tables are also kept there as text files.
#
#     bash experiments/gpu_checks.sh            # on a machine with CUDA
#     QUICK=1 bash experiments/gpu_checks.sh    # a smaller Glow (hidden 128, 8 steps per level)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks: no CUDA device here; run it where torch.cuda.is_available()')"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
python3 - "$OUT/images.npy" <<'EOF'
import sys
import numpy as np
np.save(sys.argv[1], np.random.default_rng(0).integers(0, 256, (512, 3, 32, 32), dtype=np.uint8))
EOF

python3 -m pytest -q -p no:cacheprovider tests/test_benchmark.py tests/test_bijectors.py tests/test_parity.py \
    tests/test_precision.py -k "cuda or scaler" 2>&1 | tail -3 | tee "$OUT/tests.txt"

if [ -n "${QUICK:-}" ]; then width=(--levels 3 --steps-per-level 8 --hidden 128); else width=(--levels 3 --steps-per-level 32 --hidden 512); fi
bench=(python3 -m flows bench --model glow --data "$OUT/images.npy" "${width[@]}" --batch 64 --device cuda --repeats 10)
for precision in fp16 bf16; do
    "${bench[@]}" --precision "$precision" 2>&1 | tee "$OUT/bench_$precision.txt"
done
"${bench[@]}" --compile 2>&1 | tee "$OUT/bench_compiled.txt"
