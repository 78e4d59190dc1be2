"""Serve an embedded model over OpenAI's API and talk to it with the `openai` SDK and
LangChain's `ChatOpenAI`: the second turn of a session reuses the first (cached_tokens).

Run:  python examples/serve_openai_client.py [--model NAME_OR_PATH] [--config config/x.yaml]

The server runs on a thread of this process for the demo; in production start it with
``python -m langchain_infllm.serve --model NAME --config config/X.yaml`` and point any
OpenAI client at ``http://HOST:PORT/v1``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import openai
from langchain_openai import ChatOpenAI

from langchain_infllm.serve import LocalBackend, ServeSettings, create_app
from langchain_infllm.serve.__main__ import build_core
from langchain_infllm.serve.background import BackgroundServer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--config", default=str(CONFIG_DIR / "cpu-small.yaml"))
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    core = build_core(args.model, args.config)
    app = create_app(LocalBackend(core), ServeSettings(api_key="demo-key"))
    with BackgroundServer(app) as server:
        print("serving", core.model_name, "at", server.base_url)
        client = openai.OpenAI(base_url=server.base_url, api_key="demo-key")
        session = {"X-Session-Id": "demo"}  # the same session across turns
        history: list[Any] = [{"role": "user", "content": "Name one prime number below ten."}]
        first = client.chat.completions.create(
            model=core.model_name,
            messages=history,
            max_tokens=args.max_tokens,
            extra_headers=session,
        )
        print("assistant:", first.choices[0].message.content)
        history += [
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "And one more?"},
        ]
        # Streamed, with usage on the last chunk.
        text = []
        for chunk in client.chat.completions.create(
            model=core.model_name,
            messages=history,
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=session,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                details = chunk.usage.prompt_tokens_details
                print("assistant:", "".join(text))
                print(
                    f"second turn: prompt_tokens={chunk.usage.prompt_tokens} "
                    f"cached_tokens={details.cached_tokens if details else 0}"
                )
                print("infllm:", json.dumps((chunk.model_extra or {}).get("infllm", {})))

        # LangChain's OpenAI chat model works the same way against this server.
        llm = ChatOpenAI(
            model=core.model_name,
            base_url=server.base_url,
            api_key="demo-key",
            max_tokens=args.max_tokens,
            default_headers={"X-Session-Id": "lc"},
        )
        reply = llm.invoke("Say hello in French.")
        print("ChatOpenAI:", reply.content, reply.usage_metadata)


if __name__ == "__main__":
    main()
