"""Prefect flows: the scheduled learning pipeline, rollback, and the forgetting experiment."""

import logging

# The flows are the application: cl_core's INFO lines (training phases, evaluation, adapter loads, registry retries)
# are part of a run's story. With PREFECT_LOGGING_EXTRA_LOGGERS=cl_core (set by the stack's env.sh) Prefect sends
# them to the flow run's log in the UI; the level has to let them through first (a library logger defaults to
# WARNING). A level you set on "cl_core" yourself is kept.
if logging.getLogger("cl_core").level == logging.NOTSET:
    logging.getLogger("cl_core").setLevel(logging.INFO)
