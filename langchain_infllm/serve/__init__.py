"""An OpenAI-compatible HTTP server over the chat core (FastAPI + uvicorn).

``python -m langchain_infllm.serve --model NAME --config config/X.yaml``; the Ray Serve
scale-out is in `langchain_infllm.serve.ray_app`. Needs the ``serve`` extra; nothing
else in the package imports this one.
"""

from langchain_infllm.serve.app import ServeSettings, create_app
from langchain_infllm.serve.backend import ChatBackend, LocalBackend

__all__ = ["ChatBackend", "LocalBackend", "ServeSettings", "create_app"]
