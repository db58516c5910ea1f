# The project image every Ray container runs (KubeRay manifests in infra/kuberay/ reference it):
# Ray 2.60.0 (the pin in pyproject.toml), facelab, DVC, and this checkout at /app (the RayJob ships
# it as the job's working directory; the RayService resolves project-relative base models under it).
#
#   docker build -t ghcr.io/<org>/facelab:0.1.0-ray2.60.0-py311-gpu .                  # CUDA (default)
#   docker build -t ghcr.io/<org>/facelab:0.1.0-ray2.60.0-py311-cpu \
#       --build-arg BASE=rayproject/ray:2.60.0-py311-cpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .                  # CPU only
#
# Rebuild it for every commit you run: the code, the sweep and job files and dvc.lock come from it.
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}

# The wheel index torch comes from: PyPI's default build (CUDA) unless a CPU index is given.
ARG TORCH_INDEX=https://pypi.org/simple
ARG DVC_EXTRA=s3

USER root
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
COPY --chown=ray:users . /app
USER ray
WORKDIR /app
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==2.13.0" \
 && pip install --no-cache-dir "dvc[${DVC_EXTRA}]>=3.50,<4" \
 && pip install --no-cache-dir /app \
 && facelab --version && facelab families
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
