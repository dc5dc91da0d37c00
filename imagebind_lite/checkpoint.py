"""Portable models and atomic checkpoints.

A trained model is one folder: ``config.json`` (modality, size, preprocessing, temperature,
the anchor reference) and ``model.safetensors``; ``load_model`` rebuilds it with no pickle and
runs no code from the folder unless the caller passes ``trust_code=True`` (a model of a user's
own modality carries its ``modality.py``).
Every write goes to a temporary sibling first and is renamed into place
(``imagebind_lite.files.atomic_dir``), so a crash mid-write never leaves a corrupt folder under the
final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .anchor import Anchor
from .config import AnchorConfig
from .files import atomic_dir
from .lora import lora_layers, merged_state_dict
from .models.build import build_encoder
from .registry import import_modality_file, list_modalities

MODEL_FORMAT = "imagebind_lite.encoder/1"


def save_model(encoder: torch.nn.Module, model_config: dict, folder: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors``. ``model_config`` holds ``modality``,
    ``size``, ``overrides``, ``preprocess``, ``temperature``, ``embed_dim`` and ``anchor``.

    An encoder laid out as the anchor's tower (``encoder.init=anchor``) records its
    ``architecture``, so it loads without the anchor; LoRA adapters (``encoder.trainable=lora``)
    are merged into the saved weights (the encoder itself is left as it is)."""
    adapters = list(lora_layers(encoder).values())
    state = {k: v.detach().cpu().contiguous() for k, v in merged_state_dict(encoder).items()}
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        config = {"format": MODEL_FORMAT, **model_config}
        if getattr(encoder, "architecture", None):
            config["architecture"] = encoder.architecture
        if adapters:
            rank, alpha = adapters[0].rank, adapters[0].alpha
            config["lora"] = {"layers": len(adapters), "rank": rank, "alpha": alpha, "merged": True}
        source = model_config.get("modality_file")
        if source and str(source).endswith(".py") and Path(source).is_file():
            # A user's modality travels with the model, so the folder loads anywhere.
            shutil.copyfile(source, tmp / "modality.py")
            config["modality_file"] = "modality.py"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(folder)


def ensure_modality(
    name: str, modality_file: str | None, folder: Path, trust_code: bool = False
) -> None:
    """Make ``name`` a registered modality. A built-in one, or one the caller has already
    imported, needs nothing; otherwise its ``modality_file`` (a file in ``folder`` or a module
    name) is code, and it runs only with ``trust_code=True``, as transformers'
    ``trust_remote_code``."""
    if name in list_modalities():
        return
    if not modality_file:
        raise ValueError(f"{folder}: unknown modality {name!r} and no modality file names it")
    source = str(modality_file)
    if source.endswith(".py") and not Path(source).is_absolute():
        source = str(folder / source)
    if not trust_code:
        raise ValueError(
            f"{folder}: modality {name!r} is defined by code ({source}); it is not run unless "
            "you trust it: pass trust_code=True (--trust-code), or import the modality first"
        )
    import_modality_file(source)


def _what_is_there(folder: Path) -> str:
    """A hint for a folder given where a model was expected: the runs inside it, or a run that
    has checkpoints but has not finished."""
    runs = sorted(str(p.parent.parent) for p in folder.glob("*/model/config.json"))
    if runs:
        more = f" and {len(runs) - 3} more" if len(runs) > 3 else ""
        return f" (it holds runs: {', '.join(runs[:3])}{more})"
    if (folder / "checkpoints").is_dir():
        return " (a run with checkpoints but no model/ yet: it has not finished; --resume it)"
    return ""


def load_model(folder: str | Path, device: str | torch.device = "cpu", trust_code: bool = False):
    """Rebuild a saved encoder from its folder. Returns ``(encoder, config_dict)``. Code in the
    folder (``modality.py``) runs only with ``trust_code=True`` (:func:`ensure_modality`)."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"not a saved imagebind_lite model: {path} is missing{_what_is_there(folder)}"
            )
    config = json.loads(config_path.read_text())
    if config.get("format") != MODEL_FORMAT:
        raise ValueError(f"{config_path}: unknown model format {config.get('format')!r}")
    ensure_modality(config["modality"], config.get("modality_file"), folder, trust_code)
    encoder = build_encoder(
        config["modality"],
        embed_dim=config["embed_dim"],
        size=config["size"],
        overrides=config.get("overrides"),
        preprocess=config.get("preprocess"),
        temperature=config.get("temperature"),
        architecture=config.get("architecture"),
    )
    missing, unexpected = encoder.load_state_dict(load_file(str(weights_path)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: weights do not fit the config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return encoder.to(device).eval(), config


def load_torch_state(path: str | Path) -> dict:
    """A ``.pth``/``.pt`` from elsewhere loads only as plain tensors (``weights_only=True``)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(
            f"{path}: refused to load (only tensors are allowed, weights_only=True): {err}"
        ) from None


def load_run(path: str | Path, device: str | torch.device = "cpu", trust_code: bool = False):
    """A run folder (``runs/NAME``) or a model folder -> ``(encoder, anchor, config_dict)``.

    The anchor is rebuilt from the reference saved with the model and checked against its
    recorded checksum, so an encoder is never evaluated against a different anchor silently.
    """
    path = Path(path)
    folder = path / "model" if (path / "model" / "config.json").is_file() else path
    encoder, config = load_model(folder, device, trust_code)
    anchor_ref = config["anchor"]
    anchor = Anchor(AnchorConfig(**anchor_ref["config"]), device=device)
    recorded, actual = anchor_ref.get("sha256"), anchor.identity().get("sha256")
    if recorded and actual and recorded != actual:
        raise ValueError(
            f"{folder}: the anchor checkpoint {anchor.pretrained} has changed since training "
            f"(sha256 {actual} != recorded {recorded})"
        )
    return encoder, anchor, config
