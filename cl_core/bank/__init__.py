"""The adapter bank: several LoRA adapters on one frozen base, and the router that picks one per request.

- `router`: the router contract (request in, adapter name or the base out, like vLLM's `LoRAResolver`) and the
  `ROUTERS` registry; `routers/` holds one file per router.
- `manifest`: one servable state of the whole bank (every adapter's version and the router state).
"""
