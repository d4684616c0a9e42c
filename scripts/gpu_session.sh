#!/usr/bin/env bash
# What ran on the lent GPU machine (one H200) to produce the README's GPU figures. Not part of CI.
# Expects, beside the checkout: .gpu/ (wheels: transformers 5.24, tokenizers, safetensors, gguf),
# .gpua/part_a + .gpub/part_b (the SmolLM2 GGUF split to fit the transfer limit), .gpua/scan.json
# (the CPU scan of the default model) and .gpua/IFBench_test.jsonl. Writes results under $OUT.
set -u
cat .gpua/part_a .gpub/part_b > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl
export PYTHONPATH=/tmp/site:$PWD MELSURGERY_CACHE=/tmp/mcache HF_HUB_OFFLINE=1
M=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
timeout 120 python3 scripts/gpu_check.py > "$OUT/gpu_check.txt" 2>&1
python3 -m melsurgery scan "$M" --quiet --device cuda --json "$OUT/scan_cuda.json" > /dev/null 2>> "$OUT/gpu_check.txt"
models=("$(ls -d /tmp/mcache/gguf/*/ | head -1)")
for r in wemask norm-rescale ffn-dampen me-norm; do
  python3 -m melsurgery patch "$M" -o "/tmp/o/smollm2-$r" --scan .gpua/scan.json --recipe "$r" --quiet \
    >> "$OUT/gpu_check.txt" 2>&1 && models+=("/tmp/o/smollm2-$r")
done
python3 benchmarks/eval_ifbench.py "${models[@]}" --prompts .gpua/IFBench_test.jsonl --generate-only \
  --out-dir "$OUT/ifb" --batch-size 100 --max-new-tokens 256 --no-progress > "$OUT/ifb.txt" 2>&1
