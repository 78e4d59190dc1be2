"""Next-token sampling: greedy, temperature and nucleus (top-p)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _real(value: Any, name: str) -> float:
    """A finite real number (bools and numeric strings are refused, not coerced)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def check_temperature(value: Any) -> float:
    """`temperature` as a float >= 0, or ValueError naming it."""
    number = _real(value, "temperature")
    if number < 0:
        raise ValueError(f"temperature must be >= 0, got {value!r}")
    return number


def check_top_p(value: Any) -> float:
    """`top_p` as a float in (0, 1], or ValueError naming it."""
    number = _real(value, "top_p")
    if not 0.0 < number <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {value!r}")
    return number


def check_seed(value: Any) -> int | None:
    """`seed` as None or an int torch can seed with, or ValueError naming it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {value!r} ({type(value).__name__})")
    seed = int(value)
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {seed}")
    return seed


def sample_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token id from 1-D `logits`; temperature 0 means greedy."""
    temperature = check_temperature(temperature)
    top_p = check_top_p(top_p)
    logits = logits.to(torch.float32)
    if temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator)
    return int(choice.item())
