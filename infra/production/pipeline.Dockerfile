# The image every flow run of the pipeline runs in (Kubernetes work pool `cl-kubernetes`): the repository at
# /opt/vllm-continual with the pipeline dependencies. Training runs here (PyTorch + PEFT, GPU when the Job gets
# one); serving is the separate vLLM deployment, so vLLM itself is not needed in this image.
#   docker build -f infra/production/pipeline.Dockerfile -t <registry>/cl-pipeline:<git-sha> .
#   export CL_PIPELINE_IMAGE=<registry>/cl-pipeline:<git-sha>
# torch comes from PyPI as the project pins it (its Linux wheels carry the CUDA runtime libraries).
FROM python:3.11-slim
WORKDIR /opt/vllm-continual
COPY pyproject.toml README.md ./
COPY cl_core cl_core
COPY flows flows
COPY tasks tasks
COPY infra/pipeline.yaml infra/pipeline.yaml
RUN pip install --no-cache-dir ".[pipeline]" "prefect-kubernetes" "prefect-ray"
ENV PYTHONUNBUFFERED=1
