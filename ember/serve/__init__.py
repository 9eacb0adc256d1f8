"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    ember serve --model runs/quickstart/model --port 8000

`async_engine.py` owns the `LLM` in one background thread; `app.py` holds the routes;
`protocol.py` the request models and response shapes; `metrics.py` the Prometheus text.
"""

from ember.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
