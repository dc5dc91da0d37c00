"""A new modality from one file, without touching the library.

This test file is itself that one file: it registers a toy "vibration" modality (a 1-D signal
[1, 256] with a stem of its own) and a dataset pairing it with real handwritten digit images,
then trains it through ``imagebind_lite.train.train`` with ``modality_file`` pointing here, and
rebuilds the saved model from this file with ``load_run``. The last tests run
``examples/my_modality.py`` through ``train/align.py`` as a researcher would.
"""

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script, tiny_overrides
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from imagebind_lite import modalities
from imagebind_lite.checkpoint import MODEL_FORMAT, load_model, load_run
from imagebind_lite.config import load_config
from imagebind_lite.data import avmnist
from imagebind_lite.data.datasets import DatasetBundle, EpochRandom, register_dataset
from imagebind_lite.loss import info_nce
from imagebind_lite.modalities import ModalitySpec, build_encoder, register_modality
from imagebind_lite.train import train

THIS_FILE = str(Path(__file__).resolve())
NAME, LENGTH = "vibration", 256


class SpectrumStem(nn.Module):
    """[B, 1, LENGTH] -> magnitude spectrum without DC (LENGTH / 2 bins) -> tokens of
    ``bins`` neighbouring bins -> Linear + LayerNorm. ``num_tokens`` sizes the positional table."""

    def __init__(self, width: int, length: int, bins: int):
        super().__init__()
        self.length, self.bins = length, bins
        self.num_tokens = (length // 2) // bins
        self.proj = nn.Linear(bins, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(x[:, 0], dim=-1).abs()[:, 1 : self.num_tokens * self.bins + 1]
        spectrum = spectrum / spectrum.amax(-1, keepdim=True).clamp_min(1e-6)
        return self.norm(self.proj(spectrum.unflatten(-1, (self.num_tokens, self.bins))))


def vibration(digit: int, g: torch.Generator) -> torch.Tensor:
    """[1, LENGTH]: a tone whose frequency says the digit (8 .. 107 cycles), random phase, noise."""
    t = torch.arange(LENGTH, dtype=torch.float32) / LENGTH
    phase = 2 * torch.pi * float(torch.rand((), generator=g))
    x = torch.sin(2 * torch.pi * (8 + 11 * digit) * t + phase)
    return (x + 0.3 * torch.randn(LENGTH, generator=g)).unsqueeze(0)


class VibrationDigits(EpochRandom, Dataset):
    """Signal i has digit i % 10; training pairs it with a random image of that digit, drawn
    again (with new noise) every epoch from the EpochRandom generator."""

    def __init__(self, size, train, seed=0, images=None, image_labels=None):
        self.size, self.train, self.seed, self.images = size, train, seed, images
        if images is not None:
            self.by_digit = [torch.nonzero(image_labels == d).flatten() for d in range(10)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = self.generator(index) if self.train else torch.Generator().manual_seed(index)
        digit = index % 10
        sample = {NAME: vibration(digit, g), "label": digit, "id": f"vib-{self.train}-{index}"}
        if self.images is not None:
            choices = self.by_digit[digit]
            sample["vision"] = self.images[
                int(choices[torch.randint(len(choices), (1,), generator=g)])
            ]
        return sample


def build_vibration_digits(cfg, anchor, spec):
    images, labels = avmnist.load_digit_images()
    keep = avmnist.image_split(len(images))  # the images the shipped anchor trained on
    pixels = anchor.normalize_pixels(avmnist.digits_to_pixels(images[keep], anchor.image_size[0]))
    opts = cfg.data.options
    return DatasetBundle(
        train=VibrationDigits(
            int(opts.get("train_size", 320)), True, cfg.seed, pixels, labels[keep]
        ),
        eval=VibrationDigits(int(opts.get("test_size", 200)), False),
        classnames=avmnist.DIGIT_NAMES,
        templates=avmnist.DIGIT_TEMPLATES,
    )


# pytest imports this file, and ``modality_file`` imports it again under another module name:
# register once, whichever import comes first.
if NAME not in modalities.list_modalities():
    register_modality(
        ModalitySpec(
            name=NAME,
            temperature=0.1,
            sizes={"tiny": dict(width=32, depth=1, heads=2, mlp_ratio=2.0, bins=16)},
            build_stem=lambda size, options: SpectrumStem(
                size["width"], options["length"], size["bins"]
            ),
            sample_ndim=2,
            preprocess=dict(length=LENGTH),
            description="toy 1-D vibration signal (tests/test_custom_modality.py)",
        )
    )
    register_dataset("vibration_digits")(build_vibration_digits)


def fixed_batch(anchor, n=40):
    """Held-out signals of each digit paired with held-out images of the same digit."""
    images, labels = avmnist.load_digit_images()
    held = ~avmnist.image_split(len(images))
    pixels = anchor.normalize_pixels(avmnist.digits_to_pixels(images[held], anchor.image_size[0]))
    by_digit = [torch.nonzero(labels[held] == d).flatten() for d in range(10)]
    g = torch.Generator().manual_seed(123)
    signals = torch.stack([vibration(i % 10, g) for i in range(n)])
    vision = torch.stack([pixels[by_digit[i % 10][i // 10]] for i in range(n)])
    return signals, anchor.encode_image(vision)


def test_a_modality_registered_in_this_file_trains_and_reloads(tmp_path, monkeypatch):
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            f"modality_file={THIS_FILE}",
            f"modality={NAME}",
            "data.dataset=vibration_digits",
            "anchor.pretrained=imagebind_lite:tiny-clip-digits-scenes",
            "data.options={train_size: 160, test_size: 100}",
            "optim.epochs=3",
            "optim.warmup_epochs=0.5",
        ),
    )
    metrics = train(cfg, quiet=True)
    run = tmp_path / "vibration-vibration_digits"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["steps"] == 15 and saved["num_eval"] == 100 and saved["num_classes"] == 10
    assert (run / "config.yaml").is_file() and (run / "model" / "model.safetensors").is_file()
    # The encoder never saw text, yet names the digit of a signal through the anchor.
    assert metrics["zero_shot_top1"] > 0.3, metrics  # chance: 0.1

    # A fresh process knows nothing of "vibration": the folder's code is refused unless
    # trusted, then load_run imports it from modality_file.
    monkeypatch.delitem(modalities._REGISTRY, NAME)
    with pytest.raises(ValueError, match="pass trust_code=True"):
        load_run(run)
    assert NAME not in modalities.list_modalities()
    encoder, anchor, config = load_run(run, trust_code=True)
    # The model folder carries its own copy of the modality file, so it loads anywhere.
    assert config["modality_file"] == "modality.py" and NAME in modalities.list_modalities()
    assert (run / "model" / "modality.py").read_text() == Path(THIS_FILE).read_text()
    assert isinstance(encoder.stem, nn.Module) and type(encoder.stem).__name__ == "SpectrumStem"

    # Training lowered the contrastive loss on held-out pairs, against an untrained encoder.
    signals, targets = fixed_batch(anchor)
    torch.manual_seed(0)
    untrained = build_encoder(NAME, anchor.embed_dim, "tiny").eval()
    with torch.no_grad():
        before = info_nce(untrained(signals), targets, 0.1, gather=False)
        after = info_nce(encoder(signals), targets, 0.1, gather=False)
    assert after < before - 0.5, (float(before), float(after))


def test_a_model_folder_with_code_is_refused_and_the_code_never_runs(tmp_path):
    folder, marker = tmp_path / "downloaded", tmp_path / "pwned.txt"
    folder.mkdir()
    (folder / "modality.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = {"format": MODEL_FORMAT, "modality": "evil", "modality_file": "modality.py"}
    (folder / "config.json").write_text(json.dumps({**config, "embed_dim": 8, "size": "tiny"}))
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    for load in (load_model, load_run):
        with pytest.raises(ValueError, match=r"modality 'evil' is defined by code .*modality.py"):
            load(folder)
    script = [str(REPO / "eval" / "zero_shot.py"), "--checkpoint", str(folder)]
    proc = run_script(script, cwd=os.getcwd(), timeout=120)  # a process of its own
    assert proc.returncode != 0 and "--trust-code" in proc.stderr.strip().splitlines()[-1]
    assert not marker.exists()
    with pytest.raises(KeyError):  # trusted, the code runs (and registers nothing here)
        load_model(folder, trust_code=True)
    assert marker.read_text() == "ran"


def run_align(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["train/align.py", *args])
    monkeypatch.chdir(REPO)  # as documented: commands run from the repository root
    runpy.run_path(str(REPO / "train" / "align.py"), run_name="__main__")


def test_the_example_file_trains_through_the_generic_script(tmp_path, monkeypatch):
    run_align(
        monkeypatch,
        "modality_file=examples/my_modality.py",
        "modality=my_sensor",
        "data.dataset=my_sensor_demo",
        "data.options={train_size: 64, test_size: 20}",
        *tiny_overrides(tmp_path, "optim.max_steps=2"),
    )
    run = tmp_path / "my_sensor-my_sensor_demo"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["num_eval"] == 20
    encoder, _, config = load_run(run)
    assert config["modality_file"] == "modality.py"  # copied into the model folder
    assert encoder(torch.randn(2, 3, 512)).shape == (2, 64)


def test_the_example_reader_reads_npy_files(tmp_path):
    import numpy as np

    modalities.import_modality_file(REPO / "examples" / "my_modality.py")
    spec = modalities.get_modality("my_sensor")
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(600, 3)).astype("float32"))
    x = spec.load(tmp_path / "a.npy", **spec.preprocess)
    assert x.shape == (3, 512)
    torch.testing.assert_close(x.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        spec.augment(x, True, generator=g1, **spec.preprocess),
        spec.augment(x, True, generator=g2, **spec.preprocess),
    )
    np.save(tmp_path / "bad.npy", np.zeros((4, 10)))
    with pytest.raises(ValueError, match="bad.npy: expected"):
        spec.load(tmp_path / "bad.npy", **spec.preprocess)


def test_the_generic_script_needs_a_modality(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_align(monkeypatch, "tracker=null")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: align.py: name the modality")
