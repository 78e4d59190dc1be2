"""Server-sent events framing as OpenAI streams use it: ``data: <json>\\n\\n`` per chunk,
``data: [DONE]\\n\\n`` at the end."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    """One SSE event carrying `payload` as compact JSON (no newline can split it: JSON
    escapes newlines inside strings)."""
    return (
        b"data: "
        + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        + b"\n\n"
    )


def parse_sse(body: bytes | str) -> list[dict[str, Any] | str]:
    """The payloads of an SSE body (JSON decoded; ``"[DONE]"`` kept as the string).

    For tests and the benchmark; clients use their own parser."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    out: list[dict[str, Any] | str] = []
    for block in text.split("\n\n"):
        data = [line[5:].lstrip() for line in block.splitlines() if line.startswith("data:")]
        if not data:
            continue
        joined = "\n".join(data)
        out.append(joined if joined == "[DONE]" else json.loads(joined))
    return out
