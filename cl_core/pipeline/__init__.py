"""The MLOps side of cl_core: what the Prefect tasks in `tasks/` call.

Modules (one owner each; nothing here is imported by `cl_core/__init__`, so the library never pays for boto3,
MLflow or Great Expectations unless the pipeline is used):

- `stack/`       the local stack on loopback (SeaweedFS S3, MLflow server, Prefect server + worker, vLLM server):
                 `python -m cl_core.stack up|down|status`
- `s3.py`        S3 settings and a boto3 client with retries
- `experiences.py` the S3 object layout of experience records, the writer (whole objects) and the reader
- `watermark.py` the durable pull watermark (an S3 object, replaced whole)
- `validation.py` Great Expectations validation, quarantine of invalid records, data docs
- `serving.py`   client for vLLM OpenAI servers: runtime adapter load/unload, stable-name switch on all replicas
- `evaluation.py` candidate vs champion through vLLM: held-out scores, retention probes, forgetting
- `gate.py`      promotion rules from configuration and the decision with its reasons
- `registry.py`  MLflow runs, registered adapter versions, aliases `champion` / `challenger`
- `config.py`    `PipelineConfig`: one typed configuration for all of the above
"""
