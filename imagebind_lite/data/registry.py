"""The dataset registry: a name in ``data.dataset`` -> a builder ``(cfg, anchor, spec) ->
DatasetBundle``. A leaf module: it imports nothing of the package.

The built-in datasets register in their own modules (``avmnist``, ``scenes``, ``manifest``,
``shards``, ``adapters``), which ``imagebind_lite.builtins`` imports; a researcher registers one
from any file (``docs/extending.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import wraps

_DATASETS: dict[str, Callable] = {}
_MODALITIES: dict[str, tuple[str, ...] | None] = {}


def register_dataset(name: str, modalities: Sequence[str] | None = None):
    """Decorator: register ``builder`` under ``name``. ``modalities``: the only modalities the
    dataset can pair with RGB (None: any, the builder says which it cannot)."""

    def wrap(builder: Callable) -> Callable:
        _DATASETS[name] = builder
        _MODALITIES[name] = None if modalities is None else tuple(modalities)
        return builder

    return wrap


def dataset_modalities(name: str) -> tuple[str, ...] | None:
    """The modalities a registered dataset is limited to (None: any)."""
    get_dataset_builder(name)
    return _MODALITIES.get(name)


def get_dataset_builder(name: str) -> Callable:
    """The builder of ``name``, refusing a modality the dataset was not registered for."""
    try:
        builder = _DATASETS[name]
    except KeyError:
        raise KeyError(
            f"unknown dataset {name!r}; registered: {', '.join(sorted(_DATASETS))}"
        ) from None
    allowed = _MODALITIES.get(name)
    if allowed is None:
        return builder

    @wraps(builder)
    def checked(cfg, anchor, spec, *args, **kwargs):
        if spec.name not in allowed:
            raise ValueError(
                f"dataset {name} pairs images with {' or '.join(allowed)}, not {spec.name!r}"
            )
        return builder(cfg, anchor, spec, *args, **kwargs)

    return checked


def list_datasets() -> list[str]:
    return sorted(_DATASETS)
