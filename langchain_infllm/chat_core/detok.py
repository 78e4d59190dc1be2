"""Incremental detokenization: text as soon as tokens decode to whole characters."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["Detokenizer"]

logger = logging.getLogger(__name__)


class Detokenizer:
    """``tokenizers``' ``DecodeStream`` where the tokenizer is a fast one (linear time, the
    library's own handling of byte-level pieces); else re-decoding a short window, which
    never emits half a multi-byte character. Special tokens are skipped."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._stream: Any = None
        self._backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
            tokenizer, "_tokenizer", None
        )
        if self._backend is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # pragma: no cover - tokenizers always ships it today
                self._backend = None
            else:
                self._stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token: int) -> str:
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, int(token))
            except Exception:  # an id the fast tokenizer cannot decode: fall back for good
                logger.debug("DecodeStream failed; falling back to window decoding")
                self._stream = None
            else:
                self.ids.append(int(token))
                return piece or ""
        self.ids.append(int(token))
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return str(text[len(prefix) :])
        return ""

    def flush(self) -> str:
        if self._stream is not None:
            return ""  # DecodeStream holds back only incomplete characters, dropped as today
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(self.ids)
        return str(text[len(prefix) :]) if len(text) > len(prefix) else ""
