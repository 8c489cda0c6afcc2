#!/usr/bin/env bash
# Served vs offline throughput on one workload (issue 8 target: `bench serve` at rate inf / offline >= 0.9).
#
# Runs `jaxllm bench throughput` (offline LLM.generate), then `jaxllm serve` with the same engine flags
# and `jaxllm bench serve --request-rate inf` on the same dataset and seed, and prints the ratio of
# requests/s. Both engines share one compilation cache, so the server reuses the first run's executables.
# Dummy models have no tokenizer: prompts are token ids (--tokenizer none --vocab-size V).
# benchmarks/gpu_bench_suite.py runs this comparison on sharegpt-synthetic among the other issue-8
# figures; this script stays for the random 1024/128 pair. Results name the commit from git, or
# from $JAXLLM_COMMIT where the copy of the tree has no .git.
#
#   OUT=/tmp/res bash benchmarks/gpu_serve_vs_offline.sh            # on the GPU machine (wheels in ./.whl)
#   MODEL=/tmp/tiny VOCAB=1000 TOKEN_BUCKETS=64,128 SEQ_BUCKETS=1,8 NUM_PROMPTS=8 INPUT_LEN=32 OUTPUT_LEN=8 \
#     MAX_TOKENS=128 MAX_SEQS=8 MAX_LEN=256 DTYPE=float32 ATTN=xla OUT=/tmp/res bash benchmarks/gpu_serve_vs_offline.sh
set -euo pipefail
: "${OUT:?set OUT to the results directory}"
MODEL=${MODEL:-llama-3.1-8b}; VOCAB=${VOCAB:-128256}; DTYPE=${DTYPE:-bfloat16}; ATTN=${ATTN:-pallas}
NUM_PROMPTS=${NUM_PROMPTS:-300}; INPUT_LEN=${INPUT_LEN:-1024}; OUTPUT_LEN=${OUTPUT_LEN:-128}; SEED=${SEED:-0}
TOKEN_BUCKETS=${TOKEN_BUCKETS:-512,2048}; SEQ_BUCKETS=${SEQ_BUCKETS:-1,64,256}
MAX_TOKENS=${MAX_TOKENS:-2048}; MAX_SEQS=${MAX_SEQS:-256}; MAX_LEN=${MAX_LEN:-2048}; PORT=${PORT:-8011}
export JAXLLM_COMPILATION_CACHE=${JAXLLM_COMPILATION_CACHE:-/tmp/jaxllm-xla-cache}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" "$JAXLLM_COMPILATION_CACHE"

if compgen -G ".whl/*.whl" >/dev/null; then      # the GPU machine lacks the web stack; carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

ENGINE=(--load-format dummy --dtype "$DTYPE" --attention-backend "$ATTN" --token-buckets "$TOKEN_BUCKETS"
        --seq-buckets "$SEQ_BUCKETS" --max-num-batched-tokens "$MAX_TOKENS" --max-num-seqs "$MAX_SEQS"
        --max-model-len "$MAX_LEN" --compilation-cache-dir "$JAXLLM_COMPILATION_CACHE")
DATA=(--dataset-name random --num-prompts "$NUM_PROMPTS" --random-input-len "$INPUT_LEN"
      --random-output-len "$OUTPUT_LEN" --seed "$SEED")

echo "== offline: bench throughput"
python -m serving bench throughput --model "$MODEL" "${ENGINE[@]}" "${DATA[@]}" --disable-detokenize \
  --output-json "$OUT/offline.json"

echo "== served: serve + bench serve --request-rate inf"
python -m serving serve "$MODEL" "${ENGINE[@]}" --host 127.0.0.1 --port "$PORT" --disable-log-requests \
  --uvicorn-log-level warning >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited:"; tail -30 "$OUT/server.log"; exit 1; }
  sleep 1
done
python -m serving bench serve --port "$PORT" --model "$MODEL" --tokenizer none --vocab-size "$VOCAB" "${DATA[@]}" \
  --request-rate inf --ignore-eos --disable-tqdm --save-result --result-dir "$OUT" --result-filename served.json
kill $SERVER; wait $SERVER 2>/dev/null || true; trap - EXIT

python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
off = json.loads((out / "offline.json").read_text())["results"]
srv = json.loads((out / "served.json").read_text())["results"]
ratio = srv["request_throughput"] / off["requests_per_second"]
print(f"offline {off['requests_per_second']:.2f} req/s, served {srv['request_throughput']:.2f} req/s "
      f"({srv['completed']} ok, {srv['failed']} failed): served/offline = {ratio:.3f} (target >= 0.9)")
PY
