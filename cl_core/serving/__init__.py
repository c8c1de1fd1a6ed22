"""The serving side: vLLM OpenAI servers over HTTP (`client`) and the replicas under one stable name
(`deployment`). Plain HTTP only: nothing here imports vllm, so it runs where vLLM is not installed."""
