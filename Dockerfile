# idefics-jax on TPU VMs and GKE (scripts/xpk/xpk.sh): jax with libtpu, and this package with Cloud Storage paths.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY idefics_jax ./idefics_jax
COPY convert ./convert
COPY train ./train
COPY configs ./configs
RUN python -m pip install --no-cache-dir ".[aot,gcs]"
ENTRYPOINT []
