#!/usr/bin/env bash
# The host cost of launching one tensor-parallel step, per runtime setting: benchmarks/host_dispatch.py
# --gpu (the real engine and ModelRunner on a tiny 32-layer model, so the host is the bottleneck and
# "step" is the host's cost per step) once per variant, then one table. ~1 minute a variant on
# 2 x H200 (GEMM autotuning off: the tiny model's kernels do not matter here).
#
#   OUT=/tmp/res bash benchmarks/gpu_tp_launch_flags.sh               # on a machine with >= 2 GPUs
#   OUT=/tmp/res TP=4 VARIANTS="control||" bash benchmarks/gpu_tp_launch_flags.sh
#
# Why (issue #6, results/2026-11-21-h200x2-host-dispatch.json): a TP2 step's call blocks its thread
# ~3.2 ms for ~0.3 ms of CPU (TP1: 0.40 ms), because PjRt waits for every device's launch; with the
# runner's launch thread that launch now bounds the TP2 batch-1 step (3.76 ms, GPU busy ~3.3 ms).
# NCCL_LAUNCH_MODE=PARALLEL/GROUP and collectives inside command buffers left it at 3.2-3.4 ms.
# Variants a line "tag|env assignments|XLA_FLAGS", each with what it should move (predicted before
# running; the control is 3.2 ms "exe_call" wall at TP2):
#   persistent-cliques  XLA acquires the NCCL cliques at every execution (a rendezvous of the device
#                       threads) unless --xla_gpu_collectives_use_persistent_cliques (default false):
#                       -0.05..-0.5 ms if the acquisition is what the launch waits for.
#   sync-all-reduce     async all-reduce = start/done thunks with an event record + stream wait each on
#                       a second stream (65 pairs a step); run on the compute stream instead:
#                       -0.3..-1.5 ms if those host calls are the cost.
#   no-cmd-buffers      every kernel launched on its own (measured worse at TP1 in session 2): a check
#                       that graph launches/updates are not the TP2 cost.
# Measured 2026-11-22 on 2 x H200 (results/2026-11-22-h200x2-tp-launch-flags.json), exe_call wall:
#   control 3.264 ms; persistent-cliques: jaxlib 0.11.2 rejects the flag ("Unknown flag in XLA_FLAGS");
#   sync-all-reduce 3.461 (+0.2: not the cost); no-cmd-buffers 4.949 (+1.7). No setting moves the launch.
set -uo pipefail
: "${OUT:?set OUT to the results directory}"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
TP=${TP:-2}
DEFAULT_VARIANTS="control||
persistent-cliques||--xla_gpu_collectives_use_persistent_cliques=true
sync-all-reduce||--xla_gpu_disable_async_collectives=ALLREDUCE
no-cmd-buffers||--xla_gpu_enable_command_buffer="
VARIANTS=${VARIANTS:-$DEFAULT_VARIANTS}
GUARD_S=${GUARD_S:-150}
mkdir -p "$OUT"
: > "$OUT/tp-launch-flags.txt"
while IFS='|' read -r tag envs flags; do
  [ -z "$tag" ] && continue
  echo "#### $tag  env='$envs'  XLA_FLAGS='$flags'"
  # shellcheck disable=SC2086
  env $envs XLA_FLAGS="--xla_gpu_autotune_level=0 $flags" timeout "$GUARD_S" python benchmarks/host_dispatch.py \
      --gpu --tp "$TP" --layers unrolled --batches 1 --steps 100 --no-json 2>&1 \
      | grep "unrolled\|Error\|error:\|Unknown flag" | sed "s/^/$tag /" | tee -a "$OUT/tp-launch-flags.txt"
done <<< "$VARIANTS"
echo
echo "variant               host ms/step  exe_call wall  exe_call cpu"
awk '$2 == "unrolled" { k = $1; if ($NF == "wall") { s[k] = $6; w[k] = $10 } else { c[k] = $10 } ; o[k] = 1 }
     END { for (k in o) printf "%-22s %12s %14s %13s\n", k, s[k], w[k], c[k] }' "$OUT/tp-launch-flags.txt"
