"""One object for every modality: the frozen anchor and each trained encoder, in one space.

    model = BoundModel.from_pretrained("runs/bind-digits/model")
    text = model.embed_text(["the digit seven."])
    audio = model.embed_audio(["7_theo_0.flac"])
    image = model.embed_image(["seven.png"])
    # all [N, D] unit vectors: compare any pair

A bound folder is ``bound.json`` (the anchor's reference and identity, one entry per encoder)
and one model folder per encoder (``audio/``, ``pen/``: ``config.json`` + ``model.safetensors``,
as ``checkpoint.save_model`` writes). It is written by a bind run, by combining single-modality
runs that share an anchor (``python train/bind.py --from RUN_A RUN_B --out DIR``), and loaded
with no code run unless ``trust_code=True``. ``BoundModel.from_imagebind`` wraps ImageBind's
released checkpoint (its audio, depth, thermal and IMU encoders) around the OpenCLIP ViT-H-14
anchor.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from PIL import Image

from .anchor import Anchor, looks_like_path
from .checkpoint import load_model, save_model
from .config import AnchorConfig, config_to_dict
from .evaluation.space import Space, SpaceError
from .files import atomic_dir, load_error_line
from .interop.imagebind import load_imagebind_encoders
from .registry import (
    IMAGE_TOWER,
    TEXT_TOWER,
    anchor_tower_of,
    get_modality,
    list_modalities,
    resolve_alias,
)

BOUND_FORMAT = "imagebind_lite.bound/1"
HUB_PREFIX = "hf-hub:"  # as open_clip names models on the Hugging Face Hub
# ImageBind's own anchor: OpenCLIP ViT-H-14 trained on LAION-2B.
IMAGEBIND_ANCHOR = {"model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k", "model_config": None}


class BoundModel(Space):
    """The anchor plus encoders keyed by modality; every ``embed_*`` returns [N, D] unit
    vectors in the anchor's space. Inputs: file paths, or tensors already in the encoder's input
    form (images: the anchor's normalised pixels), or strings for text."""

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        trust_code: bool = False,
        modalities: Sequence[str] | None = None,
    ) -> BoundModel:
        """A bound folder (or a run or model folder), or ``hf-hub:ORG/NAME[@REVISION]``: one on
        the Hugging Face Hub, of which only ``bound.json`` and the encoders asked for are
        downloaded. ``modalities``: load only these encoders (default: all)."""
        if str(folder).startswith(HUB_PREFIX):
            folder = _from_hub(str(folder), modalities)
        folder = Path(folder)
        index = folder / "bound.json"
        if not index.is_file():
            if (folder / "config.json").is_file() or (folder / "model" / "config.json").is_file():
                return cls.from_runs([folder], device, trust_code=trust_code)
            raise FileNotFoundError(f"not a bound model: {index} is missing")
        meta = _read_index(index)
        anchor = Anchor(AnchorConfig(**meta["anchor"]["config"]), device=device)
        _check_identity(anchor, meta["anchor"].get("sha256"), index)
        encoders, configs = {}, {}
        for modality, sub in _chosen(meta["encoders"], modalities, index).items():
            encoders[modality], configs[modality] = load_model(folder / sub, device, trust_code)
            _check_identity(anchor, configs[modality]["anchor"].get("sha256"), folder / sub)
        return cls(anchor, encoders, configs, device)

    @classmethod
    def from_imagebind(
        cls,
        checkpoint: str | Path,
        modalities: Sequence[str] = ("audio", "depth", "thermal", "imu"),
        anchor: AnchorConfig | None = None,
        device: str | torch.device = "cpu",
        num_heads: int | dict | None = None,
    ) -> BoundModel:
        """ImageBind's released checkpoint (``imagebind_huge.pth``): its encoders through the
        interop, the anchor OpenCLIP ViT-H-14 ``laion2b_s32b_b79k`` (which open_clip downloads
        or finds in its cache), or ``anchor`` to name another copy of it. ``num_heads``: as
        ``load_imagebind_encoders`` (the released model's by default)."""
        encoders = load_imagebind_encoders(checkpoint, modalities, num_heads)
        anchor_model = Anchor(anchor or AnchorConfig(**IMAGEBIND_ANCHOR), device=device)
        configs = {m: {"preprocess": dict(get_modality(m).imagebind.preprocess)} for m in encoders}
        return cls(anchor_model, {m: e.to(device) for m, e in encoders.items()}, configs, device)

    def save_pretrained(self, folder: str | Path) -> Path:
        """One folder for the whole space (written atomically: never half a bound model)."""
        identity = self.anchor.identity()
        meta = {
            "format": BOUND_FORMAT,
            "anchor": {**identity, "config": config_to_dict(self.anchor.config)},
            "encoders": {m: m for m in self.encoders},
        }
        with atomic_dir(folder) as tmp:
            for modality, encoder in self.encoders.items():
                config = {k: v for k, v in self.configs[modality].items() if k != "format"}
                source = self.runs.get(modality)
                if source is not None and (Path(source) / "model" / "modality.py").is_file():
                    config["modality_file"] = str(Path(source) / "model" / "modality.py")
                save_model(encoder, config, tmp / modality)
            (tmp / "bound.json").write_text(json.dumps(meta, indent=2))
        return Path(folder)

    def push_to_hub(self, repo: str, private: bool | None = None, token: str | None = None) -> str:
        """Upload the bound folder to the Hugging Face Hub repo ``repo`` (created if need be);
        returns the name that loads it, ``hf-hub:REPO``. Refused when the anchor is a local
        file, which nobody downloading the model could rebuild."""
        pretrained = self.anchor.config.pretrained  # as bound.json names it
        if pretrained and looks_like_path(pretrained):
            raise ValueError(
                f"push_to_hub: the anchor is the local file {pretrained}, which others cannot "
                "rebuild; use an open_clip tag or a shipped imagebind_lite: anchor"
            )
        api = HfApi(token=token)
        api.create_repo(repo, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "bound")
            api.upload_folder(repo_id=repo, folder_path=folder, commit_message="Bound model")
        return f"{HUB_PREFIX}{repo}"

    # ---------------------------------------------------------------------------- embedding

    @torch.no_grad()
    def embed(self, modality: str, inputs, batch_size: int = 32) -> torch.Tensor:
        """[N, D] unit vectors of ``inputs``: paths (any registered modality), strings (text),
        or a batch tensor in the encoder's input form."""
        modality = resolve_alias(modality)
        self._require(modality)
        if anchor_tower_of(modality) == TEXT_TOWER:
            return self.embed_texts([str(t) for t in inputs], batch_size)
        if isinstance(inputs, torch.Tensor):
            x = inputs.to(self.device)
            return F.normalize(self.encoder_fn(modality)(x).float(), dim=-1).cpu()
        paths = [Path(p) for p in inputs]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{modality} input not found: {missing[0]}")
        emb, _, _ = self.embed_files(paths, modality, batch_size, skip_bad=False)
        return emb

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.embed("text", texts)

    def embed_image(self, inputs) -> torch.Tensor:
        return self.embed("vision", inputs)

    def embed_audio(self, inputs) -> torch.Tensor:
        return self.embed("audio", inputs)

    def embed_depth(self, inputs) -> torch.Tensor:
        return self.embed("depth", inputs)

    def embed_thermal(self, inputs) -> torch.Tensor:
        return self.embed("thermal", inputs)

    def embed_imu(self, inputs) -> torch.Tensor:
        return self.embed("imu", inputs)

    def embed_pen(self, inputs) -> torch.Tensor:
        return self.embed("pen", inputs)

    @torch.no_grad()
    def embed_video(self, paths: Sequence[str | Path], frames: int = 8) -> torch.Tensor:
        """Each video: ``frames`` frames sampled evenly (PyAV), embedded by the image tower,
        the unit frame embeddings averaged and normalised again."""
        encode = self.encoder_fn(_image_modality())
        out = []
        for path in paths:
            pixels = torch.stack([self.anchor.preprocess(f) for f in video_frames(path, frames)])
            frame_emb = F.normalize(encode(pixels.to(self.device)).float(), dim=-1)
            out.append(F.normalize(frame_emb.mean(0), dim=-1).cpu())
        return torch.stack(out)


def _image_modality() -> str:
    return next(m for m in list_modalities() if anchor_tower_of(m) == IMAGE_TOWER)


def _read_index(index: Path) -> dict:
    meta = json.loads(index.read_text())
    if meta.get("format") != BOUND_FORMAT:
        raise ValueError(f"{index}: unknown bound-model format {meta.get('format')!r}")
    return meta


def _chosen(encoders: dict, modalities: Sequence[str] | None, index: Path) -> dict:
    """The ``{modality: subfolder}`` entries of ``bound.json`` that were asked for (the anchor's
    own modalities, text and vision, are always there)."""
    if modalities is None:
        return encoders
    wanted = [resolve_alias(m) for m in modalities if anchor_tower_of(resolve_alias(m)) is None]
    missing = [m for m in wanted if m not in encoders]
    if missing:
        have = ", ".join(encoders) or "none"
        raise ValueError(f"{index}: no {missing[0]!r} encoder (it has: {have})")
    return {m: encoders[m] for m in wanted}


def _from_hub(name: str, modalities: Sequence[str] | None) -> Path:
    """``hf-hub:ORG/NAME[@REVISION]`` -> its copy in the Hub's local cache: ``bound.json``
    first, then only the folders of the encoders asked for (no ``bound.json``: all of it)."""
    repo, _, revision = name[len(HUB_PREFIX) :].partition("@")
    revision = revision or None
    try:
        try:
            index = Path(hf_hub_download(repo, "bound.json", revision=revision))
        except EntryNotFoundError as err:
            if isinstance(err, LocalEntryNotFoundError):  # offline, and not in the cache
                raise
            return Path(snapshot_download(repo, revision=revision))  # a run or model folder
        subs = _chosen(_read_index(index)["encoders"], modalities, index).values()
        patterns = ["bound.json", *(f"{sub}/*" for sub in subs)]
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except OSError as err:
        detail = load_error_line(err)
        raise FileNotFoundError(
            f"{name}: not downloaded from the Hugging Face Hub: {detail}"
        ) from None


def _check_identity(anchor: Anchor, recorded: str | None, where: Path) -> None:
    actual = anchor.identity().get("sha256")
    if recorded and actual and recorded != actual:
        raise SpaceError(
            f"{where}: trained against another anchor (sha256 {recorded}, this anchor {actual}); "
            "embeddings would not share a space"
        )


def video_frames(path: str | Path, frames: int) -> list[Image.Image]:
    """``frames`` RGB frames at evenly spaced times of the first video stream (the middle of
    ``frames`` equal spans), decoded with PyAV (``pip install av``)."""
    try:
        import av
    except ImportError:
        raise SpaceError("embed_video needs PyAV: pip install av") from None
    if frames < 1:
        raise ValueError(f"frames: must be at least 1, got {frames}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            count = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
        if not count:
            raise ValueError(f"{path}: the video stream has no frames")
        picks = [min(count - 1, int((i + 0.5) * count / frames)) for i in range(frames)]
        wanted, out = set(picks), {}
        with av.open(str(path)) as container:  # a second pass converts only the picked frames
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    out[index] = frame.to_image().convert("RGB")
                if index >= picks[-1]:
                    break
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: cannot decode ({err})") from None
    if len(out) < len(wanted):
        raise ValueError(f"{path}: decoded fewer frames than the stream declares ({count})")
    return [out[i] for i in picks]


__all__ = ["BoundModel", "video_frames"]
