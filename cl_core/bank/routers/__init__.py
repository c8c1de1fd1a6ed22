"""Built-in routers, one file each; importing this package registers them in `cl_core.bank.router.ROUTERS`."""

from cl_core.bank.routers import embedding, learned, task_id  # noqa: F401
