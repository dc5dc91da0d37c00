"""The shared space as a tool: any input of any modality -> one normalised embedding.

Images and text go through the frozen anchor; audio, depth, thermal (any trained modality)
through the encoder of a run (``Space.from_runs``). Inputs are named as strings:

``text:a dog barking``     a text
``depth:frame.png``        a file read as the named modality (needed where the extension is
                           ambiguous: a depth or thermal PNG is otherwise read as an RGB image)
``clip.wav``               a file, its modality from the extension (a spec's ``extensions``:
                           images -> vision, audio -> audio, ``.txt`` -> text: the whole file
                           is one text)

Embeddings stream in batches (a ``DataLoader`` with a progress bar; only the [N, D] result is
kept) and are saved as safetensors (tensor ``embeddings``) beside a JSON list of the items
(``x.safetensors`` + ``x.safetensors.json``), so a collection is embedded once and searched many
times (``--embeddings-cache``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..anchor import Anchor
from ..checkpoint import load_run
from ..config import AnchorConfig
from ..files import atomic_write, atomic_write_text
from ..registry import (
    IMAGE_TOWER,
    TEXT_TOWER,
    anchor_tower_of,
    get_modality,
    list_modalities,
    modality_of_suffix,
    resolve_alias,
)
from .metrics import chunked_topk

EMBEDDINGS_FORMAT = "imagebind_lite.embeddings/1"


class SpaceError(ValueError):
    """A usage problem (unknown modality, no encoder for it, mismatched anchors)."""


# ------------------------------------------------------------------------------------ inputs


def anchor_modalities() -> list[str]:
    """The anchor's own modalities (image and text towers), in registration order."""
    return [n for n in list_modalities() if get_modality(n).is_anchor]


def modality_of(path: str | Path) -> str:
    ext = Path(path).suffix.lower()
    found = modality_of_suffix(ext)
    if found is None:
        raise SpaceError(
            f"{path}: cannot tell the modality from {ext or 'no extension'!r}; "
            "name it (--modality M, or M:PATH)"
        )
    return found


def parse_input(spec: str, modality: str | None = None) -> tuple[str, str]:
    """``text:...`` / ``MODALITY:PATH`` / ``PATH`` -> (modality, text or path)."""
    head, sep, rest = spec.partition(":")
    if sep and head:
        name = resolve_alias(head)
        if name in list_modalities():
            return name, rest
    if modality is not None:
        return resolve_alias(modality), spec
    if not Path(spec).exists():
        raise SpaceError(f"{spec}: no such file (write text as 'text:{spec}')")
    return modality_of(spec), spec


def expand_paths(inputs: Sequence[str | Path], modality: str | None = None) -> list[Path]:
    """Files and folders (searched recursively, sorted) -> files; in a folder only the files
    of the wanted modality's extensions (any file when the modality has no known extension)."""
    if modality:
        exts = set(get_modality(modality).extensions) if modality in list_modalities() else set()
    else:
        exts = {e for n in list_modalities() for e in get_modality(n).extensions}
    out = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += sorted(
                p for p in path.rglob("*") if p.is_file() and (not exts or p.suffix.lower() in exts)
            )
        elif path.is_file():
            out.append(path)
        else:
            raise SpaceError(f"{path}: no such file or folder")
    return out


# ------------------------------------------------------------------------ streamed embedding


class _Loading(Dataset):
    """Index -> (index, dict of tensors) or (index, error text) when bad items are skipped."""

    def __init__(self, n: int, load: Callable[[int], dict], skip_bad: bool):
        self.n, self.load, self.skip_bad = n, load, skip_bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        try:
            return index, self.load(index)
        except (OSError, ValueError, RuntimeError) as err:  # BadSample is a ValueError
            if not self.skip_bad:
                raise
            return index, f"{type(err).__name__}: {err}"


def _collate(items):
    good = [(i, x) for i, x in items if isinstance(x, dict)]
    bad = {i: x for i, x in items if not isinstance(x, dict)}
    batch = {}
    for key in good[0][1] if good else ():
        values = [x[key] for _, x in good]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return [i for i, _ in good], batch, bad


@dataclass
class Embedded:
    embeddings: dict[str, torch.Tensor]  # key -> [M, D], normalised
    kept: torch.Tensor  # [M] indices of the items embedded
    errors: dict[int, str]  # index -> why it was skipped
    extras: dict[str, list] = field(default_factory=dict)  # other keys of the items, as lists


@torch.no_grad()
def embed_stream(
    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    num_items: int,
    load: Callable[[int], dict],
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "embed",
    skip_bad: bool = True,
    device: str | torch.device = "cpu",
    extras: Sequence[str] = (),
) -> Embedded:
    """Load items in batches and encode every key of ``load(i)`` that has an encoder.

    Only the normalised embeddings are kept (plus the ``extras`` keys, e.g. ids and labels),
    so memory is [N, D] per key whatever the input size. Bad items are skipped and reported
    when ``skip_bad``; otherwise their error propagates.
    """
    loader = DataLoader(
        _Loading(num_items, load, skip_bad),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in encoders}
    gathered: dict[str, list] = {k: [] for k in extras}
    kept, errors = [], {}
    for indices, batch, bad in tqdm(loader, desc=desc, disable=not progress, leave=False):
        errors.update(bad)
        if not indices:
            continue
        kept += indices
        for key, encode in encoders.items():
            parts[key].append(F.normalize(encode(batch[key].to(device)).float(), dim=-1).cpu())
        for key in extras:
            values = batch[key]
            gathered[key] += values.tolist() if isinstance(values, torch.Tensor) else list(values)
    embeddings = {k: (torch.cat(v) if v else torch.empty(0, 0)) for k, v in parts.items()}
    return Embedded(embeddings, torch.tensor(kept, dtype=torch.long), errors, gathered)


# ------------------------------------------------------------------------ embeddings on disk


def sidecar(path: str | Path) -> Path:
    """``x.safetensors`` -> ``x.safetensors.json``: never the name of a results file."""
    return Path(path).with_name(Path(path).name + ".json")


def save_embeddings(path: str | Path, embeddings: torch.Tensor, items: Sequence, meta: dict):
    """``FILE`` (safetensors, tensor ``embeddings`` [N, D]) + ``FILE.json`` (items, meta)."""
    path = Path(path)
    if len(items) != len(embeddings):
        raise ValueError(f"{len(items)} items for {len(embeddings)} embeddings")
    info = {"format": EMBEDDINGS_FORMAT, **meta, "count": len(items), "items": list(items)}
    tensors = {"embeddings": embeddings.float().contiguous()}
    metadata = {"format": EMBEDDINGS_FORMAT, "fingerprint": str(meta.get("fingerprint"))}
    atomic_write_text(sidecar(path), json.dumps(info, indent=1))
    # The tensor file last: a complete pair, or no tensor file.
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, list, dict]:
    """-> (embeddings [N, D], items, meta)."""
    path = Path(path)
    if not path.is_file() or not sidecar(path).is_file():
        raise FileNotFoundError(f"no embeddings file {path} (with {sidecar(path).name})")
    info = json.loads(sidecar(path).read_text())
    if info.get("format") != EMBEDDINGS_FORMAT:
        raise ValueError(f"{sidecar(path)}: not an embeddings file ({info.get('format')!r})")
    embeddings = load_file(str(path))["embeddings"]
    items = info.pop("items")
    if len(items) != len(embeddings):
        raise ValueError(f"{path}: {len(embeddings)} embeddings but {len(items)} items")
    return embeddings, items, info


def items_digest(items: Sequence) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()[:16]


def cached(path: str | Path | None, items: Sequence, fingerprint: str, compute, meta=None):
    """Embeddings of ``items`` from ``path`` when it was made for exactly these items by the
    same model (same fingerprint); otherwise ``compute()`` -> (embeddings, kept items), saved.
    Returns (embeddings, the items embedded (bad ones are left out), whether the cache served)."""
    requested = items_digest(items)
    if path is not None and Path(path).is_file() and sidecar(path).is_file():
        emb, saved_items, info = load_embeddings(path)
        if info.get("fingerprint") == fingerprint and info.get("requested") == requested:
            return emb, saved_items, True
    emb, kept = compute()
    if path is not None:
        save_embeddings(
            path,
            emb,
            [str(x) for x in kept],
            {**(meta or {}), "fingerprint": fingerprint, "requested": requested},
        )
    return emb, [str(x) for x in kept], False


def tensor_fingerprint(module: torch.nn.Module, extra: dict | None = None) -> str:
    """A short hash of a module's weights and the options that shape its inputs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    digest.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------- the space


class Space:
    """The anchor plus trained encoders, keyed by modality."""

    def __init__(
        self,
        anchor,
        encoders: dict | None = None,
        configs: dict | None = None,
        device: str | torch.device = "cpu",
    ):
        self.anchor = anchor
        self.encoders = dict(encoders or {})
        self.configs = dict(configs or {})
        self.device = device
        self.runs: dict[str, Path] = {}  # modality -> the run folder its encoder came from
        # Class-prompt embeddings by (names, templates): 50 classes x 80 templates is 4,000
        # texts, the same for every fold, cache file and rerun within one process.
        self.prompt_memo: dict[tuple, tuple] = {}
        self._fingerprints: dict[str, str] = {}

    @classmethod
    def from_runs(
        cls,
        runs: Sequence[str | Path] = (),
        device: str | torch.device = "cpu",
        anchor=None,
        trust_code: bool = False,
    ) -> Space:
        """Load each run's encoder; every run must share one anchor (or the space differs).
        A run's own modality code runs only with ``trust_code`` (``checkpoint.load_model``)."""
        encoders, configs, folders = {}, {}, {}
        for run in runs:
            encoder, run_anchor, config = load_run(run, device, trust_code)
            modality = config["modality"]
            if modality in encoders:
                raise SpaceError(f"two runs give a {modality} encoder: {run}")
            if anchor is None:
                anchor = run_anchor
            elif _anchor_key(run_anchor) != _anchor_key(anchor):
                raise SpaceError(
                    f"{run}: trained against another anchor ({_anchor_key(run_anchor)} vs "
                    f"{_anchor_key(anchor)}); embeddings would not share a space"
                )
            encoders[modality], configs[modality] = encoder, config
            folders[modality] = Path(run)
        if anchor is None:
            # Images and text alone need no run: the package's default anchor embeds them.
            anchor = Anchor(AnchorConfig(), device=device)
        space = cls(anchor, encoders, configs, device)
        space.runs = folders
        return space

    @property
    def modalities(self) -> list[str]:
        return [*anchor_modalities(), *self.encoders]

    def preprocess(self, modality: str) -> dict:
        """The modality's defaults under the run's saved options (mean/std, sizes, ...)."""
        saved = self.configs.get(modality, {}).get("preprocess") or {}
        return {**get_modality(modality).preprocess, **saved}

    def fingerprint(self, modality: str) -> str:
        if modality not in self._fingerprints:
            if anchor_tower_of(modality) is not None:
                value = f"{modality}-" + "-".join(map(str, _anchor_key(self.anchor)))
            else:
                self._require(modality)
                value = tensor_fingerprint(self.encoders[modality], self.preprocess(modality))
            self._fingerprints[modality] = value
        return self._fingerprints[modality]

    def _require(self, modality: str) -> None:
        if anchor_tower_of(modality) is None and modality not in self.encoders:
            raise SpaceError(
                f"no {modality} encoder loaded: pass --checkpoint of a run trained on {modality} "
                f"(loaded: {', '.join(self.modalities)})"
            )

    def encoder_fn(self, modality: str) -> Callable[[torch.Tensor], torch.Tensor]:
        self._require(modality)
        tower = anchor_tower_of(modality)
        if tower == IMAGE_TOWER:
            return self.anchor.encode_image
        if tower == TEXT_TOWER:
            raise SpaceError(f"{modality} is encoded from strings, not tensors")
        encoder = self.encoders[modality].eval()
        return lambda x: encoder(x)

    def load_file(self, path: str | Path, modality: str) -> torch.Tensor:
        """One file -> the model input of ``modality``."""
        self._require(modality)
        if anchor_tower_of(modality) == IMAGE_TOWER:
            with Image.open(path) as image:
                return self.anchor.preprocess(image.convert("RGB"))
        spec = get_modality(modality)
        if spec.load is None:
            raise SpaceError(f"modality {modality!r} has no file reader")
        return torch.as_tensor(spec.load(Path(path), **self.preprocess(modality)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return F.normalize(self.anchor.encode_text(list(texts), batch_size).float(), dim=-1).cpu()

    def embed_files(
        self,
        paths: Sequence[str | Path],
        modality: str,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = False,
        skip_bad: bool = True,
    ):
        """-> (embeddings [M, D], the M paths embedded, {path: error} of those skipped)."""
        paths = [Path(p) for p in paths]
        if anchor_tower_of(modality) == TEXT_TOWER:
            texts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in paths]
            return self.embed_texts(texts), paths, {}
        encode = self.encoder_fn(modality)
        out = embed_stream(
            {modality: encode},
            len(paths),
            lambda i: {modality: self.load_file(paths[i], modality)},
            batch_size,
            num_workers,
            progress,
            f"embed {modality}",
            skip_bad,
            self.device,
        )
        errors = {str(paths[i]): e for i, e in out.errors.items()}
        return out.embeddings[modality], [paths[i] for i in out.kept.tolist()], errors

    def embed_input(self, spec: str, modality: str | None = None) -> tuple[torch.Tensor, str]:
        """One input string (see module doc) -> ([D] embedding, its modality)."""
        name, value = parse_input(spec, modality)
        if anchor_tower_of(name) == TEXT_TOWER:
            text_file = Path(value).suffix.lower() in get_modality(name).extensions
            if text_file and Path(value).is_file():
                value = Path(value).read_text(encoding="utf-8", errors="replace").strip()
            return self.embed_texts([value])[0], name
        x = self.load_file(value, name).unsqueeze(0).to(self.device)
        return F.normalize(self.encoder_fn(name)(x).float(), dim=-1)[0].cpu(), name


def _anchor_key(anchor) -> tuple:
    ident = anchor.identity()
    # Without a checkpoint checksum (random or tag weights) compare the weights themselves.
    return (ident.get("model"), ident.get("sha256") or tensor_fingerprint(anchor.model))


# --------------------------------------------------------------------- search and arithmetic


def combine(plus: Sequence[torch.Tensor], minus: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Embedding arithmetic: the sum of normalised embeddings (minus the others), renormalised."""
    if not plus:
        raise ValueError("at least one embedding to add")
    total = sum(F.normalize(e.float(), dim=-1) for e in plus)
    for e in minus:
        total = total - F.normalize(e.float(), dim=-1)
    return F.normalize(total, dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1))


def search(
    query: torch.Tensor, collection: torch.Tensor, items: Sequence, k: int = 5, chunk: int = 16384
) -> list[tuple[str, float]]:
    """Top-k items of the collection for one query (cosine), best first."""
    scores, indices = chunked_topk(query.view(1, -1), collection, k, gallery_chunk=chunk)
    return [(str(items[int(i)]), float(s)) for s, i in zip(scores[0], indices[0])]
