"""Next-token sampling: greedy, temperature, nucleus (top-p) and repetition penalty."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
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


def check_repetition_penalty(value: Any) -> float:
    """`repetition_penalty` as a float > 0 (1 is off), or ValueError naming it."""
    number = _real(value, "repetition_penalty")
    if number <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {value!r}")
    return number


def apply_repetition_penalty(
    logits: torch.Tensor, previous: Iterable[int], penalty: float
) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): the logit of every token already in the
    context is divided by `penalty` when positive and multiplied by it when negative, so
    a penalty > 1 always makes a repeat less likely. Returns a new tensor."""
    out = logits.to(torch.float32).clone()
    if penalty == 1.0:
        return out
    ids = torch.tensor(sorted(set(previous)), dtype=torch.long, device=out.device)
    if ids.numel() == 0:
        return out
    picked = out[ids]
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def generation_defaults(model: Any) -> dict[str, float]:
    """Sampling defaults the model ships in its ``generation_config`` (only those present
    and valid): ``temperature`` (0 when it does not sample), ``top_p``,
    ``repetition_penalty``. Chat front ends start from these so a small model that loops
    without a penalty gets the one its authors tuned."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    out: dict[str, float] = {}
    checks = {
        "temperature": check_temperature,
        "top_p": check_top_p,
        "repetition_penalty": check_repetition_penalty,
    }
    for name, check in checks.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        try:
            out[name] = check(value)
        except ValueError:
            continue
    if getattr(config, "do_sample", None) is False:
        out["temperature"] = 0.0
    return out


def sample_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    repetition_penalty: float = 1.0,
    previous: Iterable[int] = (),
) -> int:
    """Pick one token id from 1-D `logits`; temperature 0 means greedy. With a
    `repetition_penalty` other than 1, the `previous` tokens are penalised first."""
    temperature = check_temperature(temperature)
    top_p = check_top_p(top_p)
    penalty = check_repetition_penalty(repetition_penalty)
    logits = (
        apply_repetition_penalty(logits, previous, penalty)
        if penalty != 1.0
        else logits.to(torch.float32)
    )
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
