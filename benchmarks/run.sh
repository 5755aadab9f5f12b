#!/bin/sh
# Re-measure benchmarks/README.md on a quiet machine: camelid beside transformers and llama.cpp, then
# quality, speculative decoding and the per-step A/B. Needs llama-cpp-python for the llama.cpp rows.
set -e
GGUF=$(python -c "import camelid.hub as h; print(h.pull('smollm2-135m-instruct', quiet=True))")
for T in 2 1; do
  python -m camelid bench --rounds 5 --threads $T --out benchmarks/results/threads$T \
    --engines "camelid:fp32-eager,camelid:fp32,camelid:int8,camelid:int4,camelid:int8-compile,transformers:fp32,llama.cpp:$GGUF"
done
python benchmarks/quality.py "$GGUF"
python benchmarks/speculative.py "$GGUF"
python benchmarks/decode_step.py --threads 1
python benchmarks/gemm.py
