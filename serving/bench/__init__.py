"""`jaxllm bench serve | throughput | buckets`: load generator, offline throughput, bucket-ladder sweep.

Output reads like vLLM's benchmarks (same printed block, same metric definitions) so numbers can be
put side by side. Every JSON result carries the environment (device, model shape, dtype, JAX version,
git commit) from :func:`serving.bench.environment.environment_info`.

Modules: ``datasets`` (workloads), ``metrics`` (TTFT/TPOT/ITL/E2EL/goodput arithmetic, no I/O),
``serve`` (HTTP load generator), ``throughput`` (engine without HTTP), ``buckets`` (ladder sweep),
``plots`` (PNG output), ``cli`` (argument parsing).
"""
