# One image for the server and the GPU worker.
# CPU build by default; for NVIDIA GPUs build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128

# The wheel, with the migrations and the page inside it (tests/test_wheel.py installs the same).
FROM python:3.11-slim AS wheel
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stepcast stepcast
COPY server server
COPY gpu_worker gpu_worker
RUN pip wheel --no-deps --wheel-dir /dist .

FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    STEPCAST_STORAGE_DIR=/data/images \
    STEPCAST_MODEL_DIR=/opt/stepcast/models/tiny
COPY --from=wheel /dist /dist
RUN pip install --extra-index-url "$TORCH_INDEX" torch==2.13.0 \
    && pip install /dist/stepcast-*.whl \
    && rm -rf /dist
# The embedded tiny model, so the stack runs before a real model is mounted.
RUN stepcast tiny-model
RUN useradd --create-home --uid 10001 stepcast && mkdir -p /data && chown stepcast /data
# An installed stepcast keeps its .data (`stepcast run`'s Postgres and Redis) where it starts.
WORKDIR /data
USER stepcast
EXPOSE 8000
CMD ["stepcast", "serve"]
