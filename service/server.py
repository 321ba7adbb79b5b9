"""uvicorn as shipped, configured from the settings: the one HTTP server of a worker process.

Every request passes the app's ASGI middleware stack (service.app.create_app): request id and access
log, CORS, tracing, API keys, admission, body limit, then FastAPI. What a server in front does better
is left to one: the header and body deadlines against slow clients (slowloris) and the cap on open
connections are kept by the nginx proxy that compose and Kubernetes put in front
(deploy/nginx/upgrader.conf.template, docs/serving.md). uvicorn still bounds what reaches it alone:
`limit_concurrency` (UPGRADER_MAX_CONNECTIONS: 503 beyond that many connections or requests in
flight) and its keep-alive timeout.
"""

from __future__ import annotations

import uvicorn


def uvicorn_config(app, host: str, port: int, **options) -> uvicorn.Config:
    """uvicorn.Config for the app built by create_app: httptools and uvloop, the app's connection limit."""
    options = {"http": "httptools", "loop": "uvloop", "limit_concurrency": app.state.settings.max_connections, **options}
    return uvicorn.Config(app, host=host, port=port, **options)
