"""`densa serve`: an OpenAI-compatible HTTP server with streaming, continuous batching and per-request metering.

engine.py   the scheduler thread: admits requests between decode steps, decodes all running rows in one forward
batching.py rows joining (cache concatenation) and leaving (row selection) one batched decoding cache
protocol.py the OpenAI wire format: strict request models, error bodies, logprobs objects
handlers.py the OpenAI routes: requests to engine jobs, JSON responses and server-sent events
app.py      the FastAPI app: routes, error bodies, the API-key guard
metrics.py  the Prometheus /metrics page
command.py  the CLI entry and a background runner for tests and benchmarks
"""
