"""`task_id`: the request names its task, and the adapter of that name answers it; anything else reaches the base.

The simplest router and the only one that needs no embeddings: a client (or the gateway, from a request field)
says which task a prompt belongs to. A task the bank has no adapter for goes to the base model, never to a
neighbour's adapter: answering with the wrong adapter is worse than answering with none.
"""

from __future__ import annotations

from collections.abc import Sequence

from cl_core.bank.router import ROUTERS, Route, Router, RouteRequest, check_requests


@ROUTERS.register("task_id")
class TaskIdRouter(Router):
    """Route by `RouteRequest.task`: an adapter with that name, else the base model."""

    def route(self, requests: Sequence[RouteRequest]) -> list[Route]:
        check_requests(requests, needs_embeddings=False)
        routes = []
        for request in requests:
            if request.task is not None and request.task in self.adapters:
                routes.append(Route(request.task, 1.0, self.name, f"task id {request.task!r}"))
            else:
                why = "no task id" if request.task is None else f"no adapter for task {request.task!r}"
                routes.append(Route(None, 0.0, self.name, why + ": base model"))
        return routes
