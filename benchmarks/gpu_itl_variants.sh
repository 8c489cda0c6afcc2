export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMMIT=${JAXLLM_COMMIT:-wt} JAXLLM_COMPILATION_CACHE=off
P="python benchmarks/gpu_profile.py --ctx 512 --steps 30 --token-buckets 512 --max-model-len 2048 --out $OUT"
run() { tag=$1; shift; echo "#### $tag"; timeout 170 "$@" 2>&1 | grep "== batch\|check tokens\|roofline\|Error\|error:" ; }
run A-control $P --batch 1 --tag A-control
run B-mindec2 $P --batch 1 --min-decode-tokens 2 --tag B-mindec2
XLA_FLAGS=--xla_gpu_enable_command_buffer= run C-nocmdbuf $P --batch 1 --tag C-nocmdbuf
XLA_FLAGS=--xla_gpu_enable_command_buffer= run D-nocmdbuf-mindec2 $P --batch 1,64 --min-decode-tokens 2 --tag D-nocmdbuf-mindec2
