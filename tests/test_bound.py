"""BoundModel: every modality in one object, one space; combined from runs that share an anchor;
video through the image tower; ImageBind's checkpoint layout as a bound model."""

import json
import shutil
from fnmatch import fnmatch

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FSDD, REPO
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image

from imagebind_lite import BoundModel, bound
from imagebind_lite.anchor import Anchor
from imagebind_lite.config import AnchorConfig, load_config
from imagebind_lite.data.avmnist import load_digit_images
from imagebind_lite.evaluation.space import Space, SpaceError
from imagebind_lite.interop.imagebind import export_imagebind_state_dict
from imagebind_lite.models.build import build_encoder
from imagebind_lite.train import train

TINY = "encoder.overrides={depth: 1, width: 32, heads: 2}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """3-step audio and depth runs against the shipped digit/scene anchor."""
    base = tmp_path_factory.mktemp("boundruns")
    out = {}
    for modality, extra in (("audio", []), ("depth", ["data.options={train_size: 64}"])):
        cfg = load_config(
            REPO / "configs" / f"{modality}.yaml",
            [f"output_dir={base}", "tracker=null", "optim.max_steps=3", "data.batch_size=32"]
            + [TINY, "eval.batch_size=64", *extra],
        )
        out[modality] = train(cfg, quiet=True)["run_dir"]
    return out


def digit_pngs(folder, count=4):
    images, labels = load_digit_images()
    paths = []
    for i in range(count):
        pixels = (images[i].numpy() * 255).astype(np.uint8)
        paths.append(folder / f"{int(labels[i])}_{i}.png")
        Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(paths[-1])
    return paths


def test_combined_runs_embed_every_modality_in_one_space(runs, tmp_path):
    combined = BoundModel.from_runs([runs["audio"], runs["depth"]])
    folder = combined.save_pretrained(tmp_path / "bound")
    assert json.loads((folder / "bound.json").read_text())["encoders"] == {
        "audio": "audio",
        "depth": "depth",
    }
    model = BoundModel.from_pretrained(folder)
    assert model.modalities == ["text", "vision", "audio", "depth"]
    clips = sorted(FSDD.glob("3_theo_*.flac"))[:3]
    images = digit_pngs(tmp_path)
    text = model.embed_text(["the digit three.", "the digit seven."])
    audio = model.embed_audio(clips)
    image = model.embed_image(images)
    for emb, n in ((text, 2), (audio, 3), (image, 4)):
        assert emb.shape == (n, model.anchor.embed_dim)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(n))
    # The same numbers as the single runs' space: saving and reloading changes nothing.
    space = Space.from_runs([runs["audio"]])
    expected = torch.stack([space.embed_input(str(c))[0] for c in clips])
    torch.testing.assert_close(audio, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(text[0], space.embed_input("text:the digit three.")[0])
    # Tensors in the encoder's input form go straight through.
    x = torch.stack([model.load_file(c, "audio") for c in clips])
    torch.testing.assert_close(model.embed("audio", x), audio, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="audio input not found"):
        model.embed_audio([tmp_path / "absent.flac"])
    with pytest.raises(SpaceError, match="no thermal encoder"):
        model.embed_thermal(images)


def test_one_encoder_of_a_bound_folder_loads_alone(runs, tmp_path):
    folder = BoundModel.from_runs([runs["audio"], runs["depth"]]).save_pretrained(tmp_path / "b")
    audio = BoundModel.from_pretrained(folder, modalities=["audio"])
    assert audio.modalities == ["text", "vision", "audio"]
    with pytest.raises(
        ValueError, match=r"bound.json: no 'thermal' encoder \(it has: audio, depth"
    ):
        BoundModel.from_pretrained(folder, modalities=["thermal"])


def test_a_bound_model_on_the_hub_downloads_only_the_encoders_asked_for(
    runs, tmp_path, monkeypatch
):
    remote = BoundModel.from_runs([runs["audio"], runs["depth"]]).save_pretrained(tmp_path / "r")
    cache = tmp_path / "hub-cache"
    asked = []

    def hf_hub_download(repo, filename, revision=None):
        asked.append((repo, revision, filename))
        (cache / filename).parent.mkdir(parents=True, exist_ok=True)
        return str(shutil.copyfile(remote / filename, cache / filename))

    def snapshot_download(repo, revision=None, allow_patterns=None):
        asked.append((repo, revision, tuple(allow_patterns)))
        for path in remote.rglob("*"):
            name = str(path.relative_to(remote))
            if path.is_file() and any(fnmatch(name, p) for p in allow_patterns):
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, cache / name)
        return str(cache)

    monkeypatch.setattr(bound, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(bound, "snapshot_download", snapshot_download)
    model = BoundModel.from_pretrained("hf-hub:org/digits@v1", modalities=["audio"])
    assert asked == [
        ("org/digits", "v1", "bound.json"),
        ("org/digits", "v1", ("bound.json", "audio/*")),
    ]
    assert model.modalities == ["text", "vision", "audio"] and not (cache / "depth").exists()
    clips = sorted(FSDD.glob("3_theo_*.flac"))[:2]
    local = BoundModel.from_pretrained(remote)
    torch.testing.assert_close(model.embed_audio(clips), local.embed_audio(clips))

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach huggingface.co and not in the cache")

    monkeypatch.setattr(bound, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError) as err:
        BoundModel.from_pretrained("hf-hub:org/digits")
    assert str(err.value) == (
        "hf-hub:org/digits: not downloaded from the Hugging Face Hub: cannot reach "
        "huggingface.co and not in the cache"
    )


def test_push_to_hub_uploads_the_bound_folder_and_refuses_a_local_anchor(
    runs, tmp_path, monkeypatch
):
    calls = []

    class Api:  # the two HfApi calls push_to_hub makes, writing to a folder instead of the Hub
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo, private=None, exist_ok=False):
            calls.append(("create", repo, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id))
            shutil.copytree(folder_path, tmp_path / "hub")

    monkeypatch.setattr(bound, "HfApi", Api)
    model = BoundModel.from_runs([runs["audio"], runs["depth"]])
    assert model.push_to_hub("org/digits", private=True) == "hf-hub:org/digits"
    assert calls == [
        ("token", None),
        ("create", "org/digits", True, True),
        ("upload", "org/digits"),
    ]
    uploaded = BoundModel.from_pretrained(tmp_path / "hub")
    assert uploaded.modalities == model.modalities
    model.anchor.config.pretrained = str(tmp_path / "anchor.safetensors")
    with pytest.raises(ValueError, match="the anchor is the local file .*anchor.safetensors"):
        model.push_to_hub("org/digits")


def test_runs_with_different_anchors_are_refused(runs, tmp_path):
    other = tmp_path / "other"
    cfg = load_config(
        REPO / "configs" / "audio.yaml",
        [f"output_dir={other}", "tracker=null", "optim.max_steps=1", "data.batch_size=32", TINY]
        + ["anchor.pretrained=null", "eval.batch_size=64"],
    )
    run = train(cfg, quiet=True)["run_dir"]
    with pytest.raises(SpaceError, match="trained against another anchor"):
        BoundModel.from_runs([runs["depth"], run])


def write_video(path, frames):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_video_averages_evenly_sampled_frames(tmp_path):
    images, _ = load_digit_images()
    frames = []
    for i in range(12):  # 12 real digits, each a frame
        gray = Image.fromarray((images[i].numpy() * 255).astype(np.uint8)).resize((32, 32))
        frames.append(np.asarray(gray.convert("RGB")))
    write_video(tmp_path / "digits.mp4", frames)
    model = BoundModel(Anchor(AnchorConfig()))
    emb = model.embed_video([tmp_path / "digits.mp4"], frames=4)
    assert emb.shape == (1, model.anchor.embed_dim)
    # By hand: frames 1, 4, 7, 10 (the middles of four equal spans), decoded the same way.
    with av.open(str(tmp_path / "digits.mp4")) as container:
        decoded = [f.to_image().convert("RGB") for f in container.decode(video=0)]
    assert len(decoded) == 12
    pixels = torch.stack([model.anchor.preprocess(decoded[i]) for i in (1, 4, 7, 10)])
    expected = F.normalize(F.normalize(model.anchor.encode_image(pixels), dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(emb[0], expected, rtol=0, atol=1e-6)
    one = model.embed_video([tmp_path / "digits.mp4"], frames=1)
    assert not torch.allclose(one, emb)  # one middle frame is not the average of four
    with pytest.raises(ValueError, match="cannot decode|no video stream"):
        (tmp_path / "bad.mp4").write_bytes(b"not a video")
        model.embed_video([tmp_path / "bad.mp4"])


def test_imagebind_checkpoint_loads_as_a_bound_model(tmp_path):
    """A checkpoint in ImageBind's layout (exported from encoders of ImageBind's shapes at a
    small width) loads as a BoundModel whose audio embeddings equal the encoders' own."""
    anchor = Anchor(AnchorConfig())
    overrides = {"width": 32, "depth": 1, "heads": 2}
    encoders = {
        m: build_encoder(m, anchor.embed_dim, "imagebind", overrides).eval()
        for m in ("audio", "depth")
    }
    state = export_imagebind_state_dict(encoders)
    torch.save(state, tmp_path / "imagebind_tiny.pth")
    config = anchor.config
    model = BoundModel.from_imagebind(
        tmp_path / "imagebind_tiny.pth", ("audio", "depth"), anchor=config, num_heads=2
    )
    assert model.modalities == ["text", "vision", "audio", "depth"]
    assert model.preprocess("audio")["compat"] == "imagebind"
    clip = FSDD / "3_theo_0.flac"
    x = model.load_file(clip, "audio")[None]
    expected = F.normalize(encoders["audio"](x), dim=-1)
    torch.testing.assert_close(model.embed_audio([clip]), expected, rtol=0, atol=1e-5)
