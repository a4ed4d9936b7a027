# The image KubeRay runs (k8s/): Ray's own image at the Ray version pyproject.toml pins, this
# project installed into it, and the HuBERT/RMVPE weights baked in at /opt/rvc/weights, where
# k8s/base/serve-values.yaml points hubert_path and rmvpe_path. Voices live on the data volume.
#
#   mkdir -p weights && cp /path/to/hubert_base.pt /path/to/rmvpe.pt weights/   # rmvpe.pt optional
#   docker build -t registry.example.com/rvc-serve:0.1.0 .
#
# CPU-only image (cpu-dev): --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311
#                           --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

# PyPI's torch for Linux x86_64 is a CUDA build; torch first, pinned, so nothing pulls another.
ARG TORCH_INDEX=https://pypi.org/simple
WORKDIR /opt/rvc/app
COPY --chown=ray:users pyproject.toml README.md serve_config.yaml ./
COPY --chown=ray:users pipeline ./pipeline
COPY --chown=ray:users deployments ./deployments
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==2.13.0" \
 && pip install --no-cache-dir .

COPY --chown=ray:users weights/ /opt/rvc/weights/
RUN test -f /opt/rvc/weights/hubert_base.pt \
 || (echo "weights/hubert_base.pt is missing: the image must carry the content encoder" >&2; exit 1)

ENV RVC_DATA_DIR=/data RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.backpressure:install_in_proxy \
    RAY_SERVE_PROXY_USE_GRPC=1
