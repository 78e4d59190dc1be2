"""InfLLM configuration: validated knobs, and a reader for the reference's YAML layout.

The field names follow the InfLLM reference implementation (arXiv 2402.04617) so its
published configs load unchanged; a few knobs the reference hard-codes or lacks
(trace level, host-memory budget, representative placement) are added here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger(__name__)

TraceLevel = Literal["off", "summary", "full"]
CacheStrategy = Literal["lru", "lru-s"]
RetrievalMethod = Literal["infllm", "maxkey", "maxmass", "maxshare"]
"""Block scoring; `langchain_infllm.engine.retrieval` says what each does."""
MemoryPositions = Literal["fixed", "exact", "compact"]

# Keys of the reference's `model:` section that describe things this package takes from
# the model itself (rotary base and scaling) or features it does not implement. They are
# accepted so reference configs load, and ignored with a log line.
_REFERENCE_KEYS_IGNORED = {"fattn", "base", "distance_scale", "type", "path"}
# Reference keys that we accept only with the value the reference uses by default.
_REFERENCE_KEYS_FIXED: dict[str, Any] = {"faiss": False, "perhead": False}
# Top-level keys of the reference YAML that belong to its evaluation scripts.
_REFERENCE_TOP_LEVEL = {"max_len", "chunk_size", "conv_type", "truncation", "model"}


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the field and the rule."""


class InfLLMConfig(BaseModel):
    """Context-memory settings for one engine (all layers share them).

    Sizes are in tokens. `max_cached_block` bounds the blocks each layer keeps on the
    device; `topk` blocks are attended per execution chunk, so it must not exceed it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    block_size: int = Field(128, gt=0, description="Tokens per memory block.")
    n_init: int = Field(128, ge=0, description="Attention-sink tokens kept for good.")
    n_local: int = Field(4096, gt=0, description="Local window (true relative positions).")
    topk: int = Field(16, ge=0, description="Memory blocks attended per chunk and layer.")
    repr_topk: int = Field(4, gt=0, description="Tokens averaged into a representative key.")
    max_cached_block: int = Field(32, gt=0, description="Device-resident blocks per layer.")
    exc_block_size: int = Field(512, gt=0, description="Queries per execution chunk.")
    chunk_size: int = Field(8192, gt=0, description="Tokens per model call while prefilling.")
    retrieval: RetrievalMethod = Field(
        "maxkey",
        description="Block scoring: 'maxkey' (a block's best key against the query, a "
        "block set per KV head; the default), 'maxmass' (the same on per-head log "
        "attention mass), 'maxshare' (the same on each query's log share of the block "
        "maxima, so filler that recurs in every block does not tie with a fact) or "
        "'infllm' (the paper's representatives, one set per layer).",
    )
    query_group: int = Field(
        16,
        ge=0,
        description="Per-head methods: queries averaged into one retrieval query, each "
        "block scored by its best match over them (0: one mean per chunk, as the paper; "
        "16 matched full attention on the document reader's replays).",
    )
    neighbours: int = Field(
        0,
        ge=0,
        description="Per-head methods: a block also scores as its best neighbour within "
        "this many blocks, so a hit brings the text around it.",
    )
    fused_attention: bool = Field(
        True,
        description="Fused kernels merged by log-sum-exp, the paper's attention mass "
        "recomputed from the log-sum-exp (false: the fp32 reference path everywhere).",
    )
    fast_decode: bool = Field(
        True,
        description="Keep the local window's keys rotated between seals, so a decoded "
        "token rotates only its own key (false: rotate the whole window every chunk).",
    )
    last_token_alone: bool = Field(
        True,
        description="Run the last token of an append as a model call of its own, so the "
        "position whose logits pick the next token retrieves with its own query, as a "
        "decoded token does, not with the query means of its whole chunk (false: the "
        "paper's chunking).",
    )
    direct_blocks: bool = Field(
        False,
        description="Where host memory is the compute device (CPU), attend retrieved "
        "blocks straight from the layer's contiguous block store instead of copying them "
        "through the block cache (whose hit/miss counters then stay at zero).",
    )
    memory_positions: MemoryPositions = Field(
        "fixed",
        description="Where retrieved keys sit: 'fixed' puts every memory key at distance "
        "n_local (the paper); 'exact' gives them their true distance, capped at "
        "max_memory_distance, so the model still knows which of two facts came first "
        "and what follows what (blocks are then also ranked at those distances); "
        "'compact' keeps their order but packs the attended keys next to each other just "
        "behind the window (distances stay small at any length).",
    )
    max_memory_distance: int | None = Field(
        None,
        gt=0,
        description="'exact' positions: memory keys further away sit at this distance "
        "(None: the model's native window less one execution chunk).",
    )
    position_group: int = Field(
        1,
        gt=0,
        description="'compact' positions: consecutive memory keys sharing one position "
        "(1: every key its own; larger packs the memory closer to the window, as "
        "Self-Extend groups far positions).",
    )
    cache_strategy: CacheStrategy = "lru"
    score_decay: float = Field(0.1, ge=0.0, le=1.0, description="Decay for lru-s scores.")
    async_global_stream: bool = Field(True, description="Copy blocks on a side CUDA stream.")
    pin_memory: bool = Field(True, description="Pin host block memory when on CUDA.")
    repr_on_host: bool = Field(False, description="Keep representative keys in host memory.")
    dense_decoding: bool = Field(
        False, description="Accepted for reference compatibility; must stay false."
    )
    trace: TraceLevel = Field("summary", description="Retrieval records kept per call.")
    max_context: int | None = Field(None, gt=0, description="Refuse prompts longer than this.")
    session_host_budget_bytes: int | None = Field(
        None, gt=0, description="Host bytes the session store may hold before spilling."
    )

    @model_validator(mode="after")
    def _check_relations(self) -> InfLLMConfig:
        if self.topk > self.max_cached_block:
            raise ValueError(
                f"topk ({self.topk}) must be <= max_cached_block ({self.max_cached_block}): "
                "every retrieved block must fit on the device at once"
            )
        if self.n_local < self.block_size:
            raise ValueError(
                f"n_local ({self.n_local}) must be >= block_size ({self.block_size}): "
                "a block is sealed only from tokens that left the local window"
            )
        if self.repr_topk > self.block_size:
            raise ValueError(
                f"repr_topk ({self.repr_topk}) must be <= block_size ({self.block_size})"
            )
        if self.dense_decoding:
            raise ValueError("dense_decoding=true is not supported: decoding uses the memory")
        if self.max_memory_distance is not None:
            if self.memory_positions != "exact":
                raise ValueError("max_memory_distance applies only to memory_positions: exact")
            if self.max_memory_distance < self.n_local:
                raise ValueError(
                    f"max_memory_distance ({self.max_memory_distance}) must be >= n_local "
                    f"({self.n_local}): memory keys lie beyond the local window"
                )
        if self.position_group != 1 and self.memory_positions != "compact":
            raise ValueError("position_group applies only to memory_positions: compact")
        return self

    @classmethod
    def create(cls, **values: Any) -> InfLLMConfig:
        """Build a config, turning pydantic's errors into one readable `ConfigError`."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> InfLLMConfig:
        """Read a YAML file in the InfLLM reference layout (`model:` with `type: inf-llm`).

        A flat mapping of this class's fields is accepted too.
        """
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], source: str = "<mapping>") -> InfLLMConfig:
        """Build from the reference layout or a flat mapping of fields."""
        _check_keys(raw, source, "")
        if "model" not in raw:
            return _with_source(source, lambda: cls.create(**raw))
        unknown_top = set(raw) - _REFERENCE_TOP_LEVEL - {"infllm"}
        if unknown_top:
            raise ConfigError(f"{source}: unknown top-level keys {sorted(unknown_top)}")
        model = raw["model"]
        if not isinstance(model, dict):
            raise ConfigError(f"{source}: `model` must be a mapping")
        _check_keys(model, source, "model.")
        kind = model.get("type", "inf-llm")
        if kind != "inf-llm":
            raise ConfigError(f"{source}: model.type is {kind!r}; only 'inf-llm' is supported")
        values: dict[str, Any] = {}
        for key, value in model.items():
            if key in _REFERENCE_KEYS_IGNORED:
                if key not in ("type", "path"):
                    logger.info("%s: model.%s is taken from the model itself; ignored", source, key)
                continue
            if key in _REFERENCE_KEYS_FIXED:
                if value != _REFERENCE_KEYS_FIXED[key]:
                    raise ConfigError(
                        f"{source}: model.{key}={value!r} is not supported "
                        f"(only {_REFERENCE_KEYS_FIXED[key]!r})"
                    )
                continue
            values[key] = value
        if "chunk_size" in raw:
            values["chunk_size"] = raw["chunk_size"]
        max_len = _max_len(raw.get("max_len"), source)
        if max_len is not None and max_len < 2**31 - 1:
            values.setdefault("max_context", max_len)
        # Our own additions may live under a top-level `infllm:` section.
        extra = raw.get("infllm") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{source}: `infllm` must be a mapping")
        _check_keys(extra, source, "infllm.")
        values.update(extra)
        return _with_source(source, lambda: cls.create(**values))

    def fingerprint(self) -> str:
        """Hash of the fields that change what the memory holds (not trace or budgets)."""
        fields = {"block_size", "n_init", "n_local", "repr_topk", "exc_block_size"}
        if self.retrieval != "infllm":
            # Other methods keep no attention mass, so their snapshots are not the paper's
            # (and paper snapshots keep their old fingerprint).
            fields.add("retrieval")
        if self.memory_positions != "fixed":
            # The keys and values of every later token were computed through the memory,
            # so a session built with exact positions is not one built with fixed ones.
            fields.update({"memory_positions", "max_memory_distance", "position_group"})
        relevant = self.model_dump(include=fields)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def model_path_from_yaml(path: str | Path) -> str | None:
    """The reference layout names the model in `model.path`; return it if present."""
    raw = yaml.safe_load(Path(path).read_text())
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        value = raw["model"].get("path")
        return str(value) if value else None
    return None


def _check_keys(mapping: dict[Any, Any], source: str, prefix: str) -> None:
    """YAML allows non-string keys (`1: 2`); no InfLLM setting is named by one."""
    bad = [key for key in mapping if not isinstance(key, str)]
    if bad:
        raise ConfigError(
            f"{source}: {prefix}{bad[0]!r}: unknown key (setting names are strings, "
            f"got {type(bad[0]).__name__})"
        )


def _max_len(value: Any, source: str) -> int | None:
    """The reference's `max_len`: an integer token count (2**31 - 1 means unlimited)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{source}: max_len: must be an integer, got {value!r}")
    try:
        number = float(value) if isinstance(value, float) else int(value)
    except ValueError:
        raise ConfigError(f"{source}: max_len: must be an integer, got {value!r}") from None
    if isinstance(number, float) and not number.is_integer():
        raise ConfigError(f"{source}: max_len: must be an integer, got {value!r}")
    return int(number)


def _with_source(source: str, build: Any) -> InfLLMConfig:
    try:
        config: InfLLMConfig = build()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not an InfLLM setting)"
        parts.append(f"{field}: {msg}")
    return "invalid InfLLM config: " + "; ".join(parts)
