#!/usr/bin/env bash
# Decode-step variants, one gpu_profile process each (same model, same dummy seed), then one table.
# A variant is a line "tag|XLA_FLAGS|extra gpu_profile args[|env assignments]" in $VARIANTS (default:
# the list below), e.g. "tp2-no-thread||--tensor-parallel-size 2|JAXLLM_LAUNCH_THREAD=0".
#
#   OUT=/tmp/res bash benchmarks/gpu_itl_variants.sh                                 # on the GPU machine
#   OUT=/tmp/res BASE="--tensor-parallel-size 2 --batch 1,64" VARIANTS="$TP_VARIANTS" bash benchmarks/gpu_itl_variants.sh
#
# Session 2's variants (results/2026-11-21-h100-decode-profile-2-*.json) were: control, the 2-row decode
# executables (min_decode_tokens, the default since), XLA command buffers off (worse).
# Defaults now, with what each should move (predicted before running):
#   A-control        async scheduling (the default): H100 batch-1 5.93 ms, batch-64 9.03 ms (3-async.json)
#   B-noremat        --xla_gpu_memory_limit_slop_factor=400: XLA sees the donated KV cache + weights (~94 GB
#                    of "live" parameters) over its ~44 GB limit and runs rematerialisation, which re-computes
#                    small fusions per layer ("*_remat" kernels, e.g. loop_pad_fusion_31_remat 32 x 7 us at
#                    batch 64); a limit it cannot exceed should remove them: -0.1..-0.3 ms a step.
#   C-mosaic         decode attention on the Mosaic GPU kernel (TMA ring; never run on a GPU before: check
#                    benchmarks/kernels.py's pallas_mosaic correctness rows first): the Triton kernel takes
#                    71 us a layer at batch 64 x ctx 512 (~31% of copy); at 80% of copy, ~28 us: -1.4 ms a step.
# Session 5 (H100 unless named; results/2026-11-21-*-decode-profile-<tag>.json):
#   E-kvwrite        the K/V write fused into the Triton decode kernel (default since bdbea8f):
#                    batch-1 5.789 ms (predicted -0.12..-0.16 ms vs 5.928: -0.139), batch 64 9.075.
#   C-mosaic         5.932 / 9.029 ms: ties Triton in the engine (the predicted -1.4 ms at batch 64
#                    did not come: the kernel-alone gain at 128 x 4k does not carry to 64 x 512).
#   tp2-D-no-ar-kernel (--xla_gpu_allow_all_reduce_kernel=false) never ran: jaxlib rejects the flag
#                    ("Unknown flag in XLA_FLAGS", checked on 0.10.2); the one-shot all-reduce is
#                    --xla_gpu_unsupported_use_all_reduce_one_shot_kernel (D/E below, not yet run).
#   tp1/tp2-same-run (2 x H200, one run; BASE="--batch 1,64", the variants' extra args set the TP
#                    size): TP1 4.368 / 7.255 ms, TP2 5.404 / 5.917 ms; TP2 idles 48% of a step.
# Session 6 (2 x H200): tp1 f82dc35 4.333 / 7.190 ms (repeat 4.342 / 7.251); tp2 f82dc35 4.024 / 5.653
#                    (repeat 4.847 / 5.791): TP2 batch 1 is host-bound, its step call blocks the engine
#                    thread ~3 ms (host_dispatch.py --gpu). With the runner's launch thread (48a41ac, one
#                    call, JAXLLM_LAUNCH_THREAD=0 for the control): 3.763 vs 4.516 ms (predicted ~3.4:
#                    the launch itself, ~3.2 ms a step, now bounds it), batch 64 5.776 vs 5.711 (no change).
#                    The one-shot all-reduce flag, NCCL_LAUNCH_MODE and collectives in command buffers
#                    moved nothing (results/2026-11-21-h200x2-{tp-dispatch-probe,host-dispatch}.json).
# On the GPU machine the tree's git metadata can be stale: pass JAXLLM_COMMIT explicitly.
# (No NCCL symmetric-memory variant: the GPU hosts keep NVLink multicast off, NCCL_NVLS_ENABLE=0,
# because a program using it can take the shared GPUs out of service; leave those settings alone.)
# For tensor parallelism (TP2 on H200: 67 all-reduces of 16 KB cost ~3 ms of a 5.8 ms device step,
# 45-80 us each; results/2026-11-21-h200-decode-profile-tp2*.json), $TP_VARIANTS below.
set -uo pipefail
: "${OUT:?set OUT to the results directory}"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} JAXLLM_COMMIT=${JAXLLM_COMMIT:-wt}
export JAXLLM_COMPILATION_CACHE=${JAXLLM_COMPILATION_CACHE:-off}
BASE=${BASE:---batch 1,64}
DEFAULT_VARIANTS="A-control||
B-noremat|--xla_gpu_memory_limit_slop_factor=400|
C-mosaic||--attention-backend pallas-mosaic"
TP_VARIANTS="tp1-control||--tensor-parallel-size 1
tp2-A-control||
tp2-D-one-shot-off|--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false|
tp2-E-one-shot-on|--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true|
tp2-no-launch-thread||--tensor-parallel-size 2|JAXLLM_LAUNCH_THREAD=0"
VARIANTS=${VARIANTS:-$DEFAULT_VARIANTS}
# A cold 8B compile of the variant's ladder took 130-230 s on 2 x H200 (session 6: one TP1 control
# missed a 230 s guard), so the default leaves room; a warm compilation cache takes ~15 s.
# Seconds a variant may take. A cold compile of an 8B ladder with 3-4 decode batches ran past 285 s
# on an H100 (2026-11-22): on an empty cache give one variant a call (the run tool's 600 s limit).
GUARD_S=${GUARD_S:-480}
tags=()
while IFS='|' read -r tag flags extra envs; do
  [ -z "$tag" ] && continue
  echo "#### $tag  XLA_FLAGS='$flags'  $extra"
  # shellcheck disable=SC2086
  env ${envs:-} XLA_FLAGS="$flags" timeout "$GUARD_S" python benchmarks/gpu_profile.py --ctx 512 --steps 30 --token-buckets 512 \
      --max-model-len 2048 --out "$OUT" $BASE $extra --tag "$tag" 2>&1 \
      | grep "== batch\|check tokens\|roofline\|Error\|error:\|Unknown flag"
  tags+=("$tag")
done <<< "$VARIANTS"
python - "$OUT" "${tags[@]}" <<'PY'
import glob, json, sys
out, tags = sys.argv[1], sys.argv[2:]
print(f"{'variant':<24} {'batch':>5} {'step ms':>8} {'busy ms':>8} {'idle':>6} {'kernels':>8}  collective ms")
for tag in tags:
    files = sorted(glob.glob(f"{out}/*decode-profile-{tag}.json"))
    if not files:
        print(f"{tag:<24} (no result)"); continue
    for r in json.load(open(files[-1]))["runs"]:
        print(f"{tag:<24} {r['batch']:>5} {r['step_ms_unprofiled_median']:>8.3f} {r['busy_ms_per_step']:>8.3f} "
              f"{r['idle_fraction']:>6.1%} {r['kernels_per_step']:>8.0f}  {r['by_category_ms_per_step'].get('collective', 0):.3f}")
PY
