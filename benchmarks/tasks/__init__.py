"""Long-context benchmark tasks: synthetic generators, local dataset loaders and metrics.

Pure Python (standard library only). See ``benchmarks/tasks/README.md``.
"""

from .loaders import (
    INFINITEBENCH_TASKS,
    LONGBENCH_DATASETS,
    DatasetFormatError,
    load_infinitebench,
    load_longbench,
)
from .metrics import (
    LONGBENCH_DATASET_METRICS,
    LONGBENCH_METRIC_NAMES,
    mean_percent,
    score,
    score_sample,
)
from .synthetic import (
    SYNTHETIC_TASKS,
    Sample,
    answer_cue,
    approx_token_count,
    generate,
    generate_grid,
    make_messages,
    make_prompt,
)

__all__ = [
    "INFINITEBENCH_TASKS",
    "LONGBENCH_DATASETS",
    "LONGBENCH_DATASET_METRICS",
    "LONGBENCH_METRIC_NAMES",
    "SYNTHETIC_TASKS",
    "DatasetFormatError",
    "Sample",
    "answer_cue",
    "approx_token_count",
    "generate",
    "generate_grid",
    "load_infinitebench",
    "load_longbench",
    "make_messages",
    "make_prompt",
    "mean_percent",
    "score",
    "score_sample",
]
