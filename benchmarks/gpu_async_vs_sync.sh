#!/usr/bin/env bash
# Async scheduling vs synchronous on the decode-step profile (issue 8): one process each, one shared
# compilation cache (the second start loads the executables). Prints step time, device busy and GPU
# idle per batch size for both, whether the check tokens agree, and writes "async" or "sync" (the
# faster at every batch size, ties to sync) to $OUT/async-decision.txt for a following run to use.
#
#   OUT=/tmp/res bash benchmarks/gpu_async_vs_sync.sh               # on the GPU machine
#   OUT=/tmp/res MODEL=/tmp/tiny ATTN=xla DTYPE=float32 BATCH=1,4 CTX=32 STEPS=4 TOKEN_BUCKETS=64 \
#     MAX_LEN=256 bash benchmarks/gpu_async_vs_sync.sh                # CPU check
set -uo pipefail
: "${OUT:?set OUT to the results directory}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAXLLM_COMPILATION_CACHE=${JAXLLM_COMPILATION_CACHE:-/tmp/jaxllm-xla-cache}
# The two runs and their table: gpu_itl_variants.sh (later flags win, so BASE overrides its defaults).
BASE="--model ${MODEL:-llama-3.1-8b} --dtype ${DTYPE:-bfloat16} --attention-backend ${ATTN:-pallas}
      --batch ${BATCH:-1,64} --ctx ${CTX:-512} --steps ${STEPS:-30} --token-buckets ${TOKEN_BUCKETS:-512}
      --max-model-len ${MAX_LEN:-2048}" GUARD_S=${GUARD_S:-300} \
VARIANTS="${TAG:-}sync||--no-async-scheduling
${TAG:-}async||--async-scheduling" bash benchmarks/gpu_itl_variants.sh
python - "$OUT" "${TAG:-}" <<'PY'
import glob, json, sys
out, tag = sys.argv[1], sys.argv[2]
runs = {}
for mode in ("sync", "async"):
    files = sorted(glob.glob(f"{out}/*decode-profile-{tag}{mode}.json"))
    if files:
        runs[mode] = json.load(open(files[-1]))
if len(runs) < 2:
    print(f"missing a run: have {sorted(runs)}"); open(f"{out}/async-decision.txt", "w").write("sync\n"); sys.exit(1)
wins = [a["step_ms_unprofiled_median"] < s["step_ms_unprofiled_median"]
        for s, a in zip(runs["sync"]["runs"], runs["async"]["runs"])]
same = runs["sync"]["check_tokens"] == runs["async"]["check_tokens"]
print(f"check tokens {'agree' if same else 'DIFFER'}; startup sync {runs['sync']['startup_s']} s, async {runs['async']['startup_s']} s")
decision = "async" if all(wins) and same else "sync"
print("faster at every batch size:", decision)
open(f"{out}/async-decision.txt", "w").write(decision + "\n")
PY
