"""Sampling and output-shape parameters of one chat turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["GenerationParams"]


@dataclass(frozen=True)
class GenerationParams:
    """How to generate one turn. ``None`` fields fall back to the model's own defaults."""

    max_tokens: int | None = None
    """Most new tokens; ``None``: the configured default, never past ``max_context``."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    """``None``: the model's ``generation_config`` value (1.0 if it has none)."""
    tool_choice: str | None = None
    """``None``/``"auto"``, ``"none"``, ``"required"``, or the name of one tool."""
    response_format: dict[str, Any] | None = None
    """OpenAI ``{"type": "json_schema", "json_schema": {...}}`` or ``{"type": "json_object"}``."""
