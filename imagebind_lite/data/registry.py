"""The dataset registry: a name in ``data.dataset`` -> a builder ``(cfg, anchor, spec) ->
DatasetBundle``. A leaf module: it imports nothing of the package.

The built-in datasets register in their own modules (``avmnist``, ``scenes``, ``manifest``,
``shards``, ``adapters``), which ``imagebind_lite.builtins`` imports; a researcher registers one
from any file (``docs/extending.md``).
"""

from __future__ import annotations

from collections.abc import Callable

_DATASETS: dict[str, Callable] = {}


def register_dataset(name: str):
    def wrap(builder: Callable) -> Callable:
        _DATASETS[name] = builder
        return builder

    return wrap


def get_dataset_builder(name: str) -> Callable:
    try:
        return _DATASETS[name]
    except KeyError:
        raise KeyError(
            f"unknown dataset {name!r}; registered: {', '.join(sorted(_DATASETS))}"
        ) from None


def list_datasets() -> list[str]:
    return sorted(_DATASETS)
