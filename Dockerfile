# featstore on a GPU machine: CUDA PyTorch base image, DALI for CUDA 13, the package, `featstore` as entry point.
#   docker build -t featstore .
#   docker run --gpus all -v /data:/data -v $PWD:/work featstore extract --model dino --weights /work/dinov2_vits14_pretrain.pth \
#       --dataset imagenet --data-root /data/imagenet --out /work/in1k-dinov2s.zarr
# DALI's wheel here is the CUDA 13 build (nvidia-dali-cuda130): keep the base on CUDA 13 (driver >= 580)
ARG BASE=pytorch/pytorch:2.9.1-cuda13.0-cudnn9-runtime
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/featstore
COPY pyproject.toml README.md ./
COPY featstore ./featstore
COPY probe ./probe
# torch comes with the image; pip keeps it because it satisfies the requirement
RUN pip install . && python -c "import featstore, nvidia.dali, zarr, timm"
WORKDIR /work
ENTRYPOINT ["featstore"]
CMD ["--help"]
