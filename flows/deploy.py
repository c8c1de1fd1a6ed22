"""Register the pipeline's deployments with the Prefect server; the worker of work pool `cl-local` runs them.

`python -m flows.deploy` (idempotent; `infra/stack.sh up` calls it). periodic-learning gets the schedule from
infra/pipeline.yaml, so scheduled runs appear in the Prefect UI; rollback and forgetting-experiment run on demand
(`prefect deployment run rollback/rollback -p version=3`). Production uses the same code with a Kubernetes or Ray
work pool instead (infra/production/prefect.yaml).
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from prefect import flow
from prefect.schedules import Cron, Interval

from cl_core.pipeline.config import REPO_ROOT, PipelineConfig

WORK_POOL = "cl-local"


def deploy(config_path: str | None = None, work_pool: str = WORK_POOL) -> list[str]:
    config = PipelineConfig.load(config_path)
    s = config.schedule
    schedule = (Cron(s.cron, timezone=s.timezone) if s.cron else
                Interval(timedelta(minutes=s.interval_minutes), timezone=s.timezone))
    params = {"config_path": str(config_path)} if config_path else {}
    ids = []
    for entrypoint, name, kwargs in (
            ("flows/periodic_learning.py:periodic_learning", "scheduled",
             dict(schedule=schedule, parameters=params, concurrency_limit=1)),
            ("flows/rollback.py:rollback", "on-demand", dict(parameters=params)),
            ("flows/forgetting_experiment.py:forgetting_experiment", "on-demand", {})):
        source = flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoint)
        ids.append(str(source.deploy(name=name, work_pool_name=work_pool, print_next_steps=False,
                                     ignore_warnings=True, **kwargs)))
    return ids


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--work-pool", default=WORK_POOL)
    args = parser.parse_args()
    for deployment_id in deploy(args.config, args.work_pool):
        print(deployment_id)
