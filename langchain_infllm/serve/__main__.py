"""``python -m langchain_infllm.serve --model NAME --config config/X.yaml``: serve one model
over OpenAI's chat completions API with uvicorn.

The API key may come from ``--api-key`` or the ``INFLLM_API_KEY`` environment variable
(which keeps it out of the process list).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_infllm.chat_core import ChatCore

logger = logging.getLogger("langchain_infllm.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m langchain_infllm.serve",
        description="OpenAI-compatible chat completions server on an InfLLM engine.",
    )
    parser.add_argument("--model", required=True, help="embedded name, hub id or local folder")
    parser.add_argument("--config", default=None, help="InfLLM YAML config")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("INFLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $INFLLM_API_KEY)",
    )
    parser.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=2048,
        help="cap on max_tokens per request (also the default)",
    )
    parser.add_argument(
        "--max-concurrent-sessions",
        type=int,
        default=16,
        help="sessions generating at once; one more gets 429",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        help="sessions kept by the chat core (passed to ChatCore)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--log-level", default="info")
    return parser


def build_core(
    model: str, config: str | dict[str, Any] | None, *, max_sessions: int | None = None
) -> ChatCore:
    """A chat core on a freshly loaded engine (the weights are fetched on first use);
    `config` is a YAML path or a mapping of `InfLLMConfig` fields."""
    from langchain_infllm.chat_core import ChatCore
    from langchain_infllm.config import InfLLMConfig
    from langchain_infllm.engine import InfLLMEngine

    engine = InfLLMEngine.from_pretrained(
        model, InfLLMConfig.create(**config) if isinstance(config, dict) else config
    )
    return ChatCore(engine, max_sessions=max_sessions)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from langchain_infllm.serve.app import ServeSettings, create_app
    from langchain_infllm.serve.backend import LocalBackend

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    core = build_core(args.model, args.config, max_sessions=args.max_sessions)
    settings = ServeSettings(
        api_key=args.api_key or None,
        max_request_bytes=args.max_request_bytes,
        max_tokens_cap=args.max_tokens,
        max_concurrent_sessions=args.max_concurrent_sessions,
    )
    app = create_app(LocalBackend(core), settings)
    logger.info("serving %s on http://%s:%d/v1", core.model_name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
