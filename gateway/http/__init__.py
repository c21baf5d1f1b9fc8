"""The gateway's HTTP API: the Code Llama model card's /score and OpenAI-compatible /v1 routes, on the same
Generations (queue, workers, admission, deadlines, cancellation) as the gRPC API.

server.py        aiohttp app: routes, middleware (API keys, metrics, errors), server-sent events, start/stop
score.py         POST /score: the model card's request <-> GenerateRequest
openai_compat.py /v1/completions, /v1/chat/completions, /v1/models <-> Generate/Infill/ChatRequest
pieces.py        token ids as OpenAI's logprobs show them
runs.py          one HTTP request's generations, opened and read as one stream of choices
params.py        typed reading of JSON bodies; error field names as the client spells them
errors.py        errors in OpenAI's shape; gRPC status -> HTTP status
"""

from gateway.http.server import HttpApi, ssl_context

__all__ = ["HttpApi", "ssl_context"]
