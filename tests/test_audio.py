"""Audio preprocessing: the engine against the reference recipe, options, bad input, formats.

The reference (``audio_reference``) is ImageBind's recipe written out per file and per clip;
the public functions run the batched engine and must give the reference's output bit for bit,
on the FSDD recordings shipped with the package and on files written from them at other rates,
lengths and channel counts. Only public functions are called.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
import torchaudio.functional as AF
from conftest import run_script
from torchaudio.compliance import kaldi

from imagebind_lite.data import audio, audio_reference

REPO = Path(__file__).resolve().parents[1]
# FSDD's spoken digits (8 kHz mono PCM_16), shipped as FLAC for the AV-MNIST example.
RECORDINGS = REPO / "imagebind_lite" / "assets" / "avmnist" / "audio"
PAD_VALUE = (0 - audio.IMAGEBIND_MEAN) / audio.IMAGEBIND_STD  # 0.467
SILENCE_VALUE = (
    float(np.log(np.finfo(np.float32).eps)) - audio.IMAGEBIND_MEAN
) / audio.IMAGEBIND_STD


def reference(paths, **options) -> torch.Tensor:
    """The reference recipe, one file and one clip at a time."""
    return audio_reference.load_and_transform_audio(paths, **options)


def imagebind(paths, **options) -> torch.Tensor:
    """load_and_transform_audio in imagebind mode unless told otherwise, padding warnings off."""
    options.setdefault("compat", "imagebind")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", audio.AudioPaddingWarning)
        return audio.load_and_transform_audio(paths, **options)


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    # The engine computes on single-threaded torch; the reference's clip means over more than
    # 32768 samples round by thread count, so it runs single-threaded too. (It also keeps
    # torch's OpenMP threads from spinning against other jobs on a shared machine.)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fsdd() -> list[Path]:
    files = sorted(RECORDINGS.glob("*.flac"))[:40]
    if len(files) < 40:
        pytest.skip(f"too few recordings in {RECORDINGS}")
    return files


def concat_fsdd(files: list[Path], seconds: float) -> tuple[np.ndarray, int]:
    """Several spoken digits back to back, cut to ``seconds`` (FSDD is 8 kHz mono)."""
    parts, rate = [], None
    for path in files:
        data, rate = sf.read(str(path), dtype="float32")
        parts.append(data)
        if sum(len(p) for p in parts) >= seconds * rate:
            break
    joined = np.concatenate(parts)
    assert len(joined) >= seconds * rate, "not enough FSDD audio"
    return joined[: int(seconds * rate)], rate


def write_recording(
    fsdd, path: Path, rate: int, seconds: float, channels: int = 1, subtype: str = "PCM_16"
) -> Path:
    """Real speech at ``rate``: FSDD digits joined, resampled, with distinct extra channels."""
    data, source_rate = concat_fsdd(fsdd, seconds + 0.01)
    wave = AF.resample(torch.from_numpy(data), source_rate, rate).numpy()[: int(seconds * rate)]
    sides = [wave] + [0.5 * np.roll(wave[::-1], 997 * c) + 0.1 * c for c in range(1, channels)]
    sf.write(path, np.clip(np.stack(sides, axis=1), -1, 1), rate, subtype=subtype)
    return path


@pytest.fixture(scope="module")
def long_file(fsdd, tmp_path_factory) -> Path:
    """5.5 s with a DC offset: ImageBind's three 2 s clips overlap (0-2, 1.75-3.75, 3.5-5.5)."""
    data, rate = concat_fsdd(fsdd, 5.5)
    path = tmp_path_factory.mktemp("audio") / "long_dc.wav"
    sf.write(path, data * 0.5 + 0.3, rate, subtype="FLOAT")
    return path


# (rate, seconds, channels, subtype): FSDD's own rate and the usual recording rates; shorter
# than one 25 ms window, shorter than a clip, overlapping clips (2-6 s), clips apart used as
# views (up to twice the clips' length) and as copies (beyond), mono to three channels.
RECORDING_SHAPES = [
    (8000, 0.02, 1, "PCM_16"),
    (8000, 3.0, 2, "PCM_16"),
    (11025, 4.5, 2, "FLOAT"),
    (16000, 0.9, 1, "PCM_16"),
    (16000, 10.0, 2, "PCM_16"),
    (16000, 14.0, 1, "FLOAT"),
    (22050, 1.7, 3, "PCM_24"),
    (22050, 7.0, 1, "PCM_16"),
    (44100, 0.3, 2, "PCM_16"),
    (44100, 5.0, 1, "PCM_16"),
    (48000, 2.5, 1, "FLOAT"),
    (48000, 10.0, 2, "PCM_16"),
]


@pytest.fixture(scope="module")
def recordings(fsdd, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("recordings")
    written = [
        write_recording(fsdd, folder / f"{rate}_{seconds}s_{channels}ch.wav", *shape)
        for shape in RECORDING_SHAPES
        for rate, seconds, channels, _ in [shape]
    ]
    return fsdd[:6] + written


@pytest.mark.parametrize("compat", ["default", "imagebind"])
def test_engine_equals_reference_on_recordings(recordings, compat):
    expected = reference(recordings, compat=compat)
    assert expected.shape == (len(recordings), 3, 1, 128, 204)
    # Twice: the second call takes the paths that first use has set up (probed kernels,
    # grown buffers).
    for _ in range(2):
        assert torch.equal(imagebind(recordings, compat=compat), expected)
    for path, feats in zip(recordings, expected):
        assert torch.equal(imagebind([path], compat=compat, num_workers=1)[0], feats)


@pytest.mark.parametrize("compat", ["default", "imagebind"])
@pytest.mark.parametrize(
    "options",
    [
        {"num_clips": 1},
        {"num_clips": 5, "clip_duration": 1.0},
        {"num_mel_bins": 64, "target_length": 112, "utterance_norm": True},
        {"target_length": 100},
        {"sample_rate": 22050, "num_mel_bins": 80},
    ],
    ids=["one-clip", "five-1s-clips", "64-bins-utterance-norm", "cropped", "22k"],
)
def test_engine_equals_reference_with_options(recordings, compat, options):
    files = [recordings[0], *recordings[-6:]]
    expected = reference(files, compat=compat, **options)
    assert torch.equal(imagebind(files, compat=compat, **options), expected)


@pytest.mark.parametrize("compat", ["default", "imagebind"])
def test_waveform_to_clips_equals_reference(recordings, compat):
    for path in recordings[4:]:
        wav, sr = audio.read_audio(path)
        before = wav.clone()
        expected = audio_reference.waveform_to_clips(wav, sr, {"compat": compat})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", audio.AudioPaddingWarning)
            got = audio.waveform_to_clips(wav, sr, {"compat": compat})
            assert torch.equal(got, expected)
            assert torch.equal(wav, before), "the input must not be shifted in place"
            if wav.shape[0] == 1:  # 1-D and float64 input give the same features
                assert torch.equal(audio.waveform_to_clips(wav[0], sr, {"compat": compat}), got)
            assert torch.equal(audio.waveform_to_clips(wav.double(), sr, {"compat": compat}), got)


def _kaldi_fbank(clip: torch.Tensor, rate: int = 16000, mel_bins: int = 128) -> torch.Tensor:
    """ImageBind's fbank call on a [channels, samples] clip -> [mel_bins, frames]."""
    return kaldi.fbank(
        clip,
        htk_compat=True,
        sample_frequency=rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=mel_bins,
        dither=0.0,
        frame_length=25,
        frame_shift=10,
    ).T


def imagebind_data_py(path: Path) -> torch.Tensor:
    """ImageBind's ``load_and_transform_audio_data`` for one file, its steps as it writes them."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    waveform = torch.from_numpy(data.T.copy())
    if sr != 16000:
        waveform = AF.resample(waveform, orig_freq=sr, new_freq=16000)
    step = Fraction(max(waveform.shape[1] / 16000 - 2, 0)) / 2
    clips = []
    for i in range(3):
        start, end = step * i, step * i + 2
        clip = waveform[:, int(start * 16000) : int(end * 16000)]
        clip -= clip.mean()  # in place: the views overlap, so later clips see this shift
        feats = _kaldi_fbank(clip)
        if feats.shape[1] < 204:
            feats = torch.nn.functional.pad(feats, (0, 204 - feats.shape[1]))
        feats = feats[:, :204]
        clips.append(((feats - audio.IMAGEBIND_MEAN) / audio.IMAGEBIND_STD).unsqueeze(0))
    return torch.stack(clips)


def test_reference_is_imagebinds_recipe(recordings, long_file):
    # The reference's imagebind mode is ImageBind's code, bit for bit (files of at least one
    # 25 ms window: ImageBind's fbank asserts on shorter ones).
    for path in [long_file, *recordings[1:3], *recordings[7:]]:
        assert torch.equal(reference([path], compat="imagebind")[0], imagebind_data_py(path))


def test_clips_of_few_frames_exact_when_batched(fsdd, tmp_path):
    # 25-45 ms files: one to three frames, whose mel product the BLAS sums in another order
    # than a group's; batched with ordinary files they must still equal the per-clip recipe.
    data, rate = sf.read(str(fsdd[0]), dtype="float32")
    short = []
    for samples in (210, 300, 360):
        short.append(tmp_path / f"short_{samples}.wav")
        sf.write(short[-1], data[1000 : 1000 + samples], rate)
    files = [*fsdd[:4], *short]
    for compat in ("imagebind", "default"):
        assert torch.equal(imagebind(files, compat=compat), reference(files, compat=compat))


def test_imagebind_short_fsdd_clips(fsdd):
    files = fsdd[:6]
    durations = [sf.info(str(p)).duration for p in files]
    assert min(durations) < 2.0
    out = imagebind(files)
    assert out.shape == (6, 3, 1, 128, 204)
    assert torch.equal(out, reference(files, compat="imagebind"))
    # A file under 2 s: three clips of the whole file, few frames, padded with 0.467.
    frames = 1 + (int(durations[0] * 16000) - 400) // 160
    assert frames < 204
    torch.testing.assert_close(
        out[0, :, :, :, frames:], torch.full_like(out[0, :, :, :, frames:], PAD_VALUE)
    )
    assert not torch.allclose(out[0, 0, 0, :, frames - 1], torch.tensor(PAD_VALUE))
    torch.testing.assert_close(out[0, 0], out[0, 1], atol=1e-4, rtol=0)


def test_imagebind_overlap_quirk_on_long_file(long_file):
    out = imagebind([long_file])
    assert out.shape == (1, 3, 1, 128, 204)
    assert torch.equal(out, reference([long_file], compat="imagebind"))
    # 2 s clips give 198 frames and 6 padding columns of 0.467.
    torch.testing.assert_close(out[..., 198:], torch.full_like(out[..., 198:], PAD_VALUE))
    assert not torch.allclose(out[..., 197], torch.tensor(PAD_VALUE))
    # The first clip has no earlier neighbour; the later ones inherit the in-place shift.
    # (Default mode's float64-built resampling kernel accounts for differences up to 6e-4.)
    default = audio.load_and_transform_audio([long_file])
    diff = (out - default).abs().amax(dim=(0, 2, 3, 4))
    assert diff[0] < 1e-3
    assert diff[1:].max() > 1e-2


def test_imagebind_stereo(fsdd, tmp_path):
    # 4.5 s at 11.025 kHz: overlapping clips, and a resampling kernel unlike FSDD's 8 kHz one.
    rate, seconds = 11025, 4.5
    left, _ = concat_fsdd(fsdd[:20], seconds * rate / 8000)
    right, _ = concat_fsdd(fsdd[20:], seconds * rate / 8000)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, 0.3 * right + 0.4], axis=1), rate, subtype="FLOAT")
    out = imagebind([path])
    assert torch.equal(out, reference([path], compat="imagebind"))
    # Default mode mixes both channels down; ImageBind keeps channel 0.
    assert (audio.load_and_transform_audio([path]) - out).abs().max() > 1e-2
    # ImageBind's fbank sees only channel 0, but its in-place shift is the mean over both
    # channels: the first clip matches the left channel alone, the overlapping ones do not.
    left_only = tmp_path / "left.wav"
    sf.write(left_only, left, rate, subtype="FLOAT")
    diff = (imagebind([left_only]) - out).abs().amax(dim=(0, 2, 3, 4))
    assert diff[0] < 1e-3
    assert diff[1:].max() > 1e-2


def test_imagebind_warns_on_heavy_padding(fsdd):
    with pytest.warns(audio.AudioPaddingWarning, match=fsdd[0].name):
        audio.load_and_transform_audio(fsdd[:1], compat="imagebind")
    with warnings.catch_warnings():
        warnings.simplefilter("error", audio.AudioPaddingWarning)
        audio.load_and_transform_audio(fsdd[:1])


def test_workers_and_batching_do_not_change_output(fsdd):
    files = fsdd[:12]
    serial = imagebind(files, num_workers=1)
    assert torch.equal(imagebind(files, num_workers=3), serial)
    one_by_one = torch.stack([audio.waveform_to_clips(*audio.read_audio(p)) for p in files])
    assert torch.equal(audio.load_and_transform_audio(files), one_by_one)


def test_features_do_not_depend_on_torch_threads(tmp_path):
    # Three channels: ImageBind's clip mean then sums 96000 samples, a parallel reduction.
    rng = np.random.default_rng(4)
    path = tmp_path / "three_channels.wav"
    sf.write(path, rng.normal(0.1, 0.2, (46305, 3)).astype(np.float32), 11025, subtype="FLOAT")
    wav, sr = audio.read_audio(path)
    single = audio.waveform_to_clips(wav, sr, {"compat": "imagebind"})
    torch.set_num_threads(2)
    try:
        double = audio.waveform_to_clips(wav, sr, {"compat": "imagebind"})
        batched = imagebind([path, path], num_workers=2)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(single, double)
    assert torch.equal(batched[0], single) and torch.equal(batched[1], single)
    assert torch.equal(single, reference([path], compat="imagebind")[0])


def test_clip_bounds():
    assert audio.imagebind_clip_bounds(160000, 16000, 2, 3) == [
        (0, 32000),
        (64000, 96000),
        (128000, 160000),
    ]
    assert audio.imagebind_clip_bounds(80000, 16000, 2, 3) == [
        (0, 32000),
        (24000, 56000),
        (48000, 80000),
    ]
    assert audio.imagebind_clip_bounds(16000, 16000, 2, 3) == [(0, 32000)] * 3
    assert audio.clip_starts(10.0, 2.0, 3) == [0.0, 4.0, 8.0]
    # The bounds are ImageBind's exact-fraction times truncated to samples.
    for samples, rate in [(88200, 44100), (80001, 16000), (37000, 11025)]:
        step = Fraction(max(samples / rate - 2.0, 0)) / 2
        expected = [(int(step * i * rate), int((step * i + 2) * rate)) for i in range(3)]
        assert audio.imagebind_clip_bounds(samples, rate, 2.0, 3) == expected


@pytest.mark.parametrize("compat", ["default", "imagebind"])
def test_options_change_shape(long_file, compat):
    base = {"compat": compat, "num_workers": 1}
    assert imagebind([long_file], **{**base, "num_clips": 5}).shape == (1, 5, 1, 128, 204)
    assert imagebind([long_file], **{**base, "num_clips": 1}).shape == (1, 1, 1, 128, 204)
    out = imagebind([long_file], **{**base, "clip_duration": 1.0})
    assert out.shape == (1, 3, 1, 128, 204)
    torch.testing.assert_close(out[..., 98:], torch.full_like(out[..., 98:], PAD_VALUE))
    assert imagebind([long_file], **{**base, "num_mel_bins": 64}).shape == (1, 3, 1, 64, 204)
    cropped = imagebind([long_file], **{**base, "target_length": 100})
    assert cropped.shape == (1, 3, 1, 128, 100)
    assert torch.equal(cropped, imagebind([long_file], **base)[..., :100])
    with pytest.raises(ValueError, match="compat"):
        audio.load_and_transform_audio([long_file], compat="bogus")


def test_silent_audio_loads(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000 * 3, dtype=np.float32), 16000)
    wav, _ = audio.read_audio(path)
    assert audio.is_silent(wav)
    assert not audio.is_silent(wav + 1e-3)
    assert audio.is_silent(wav + 1e-3, threshold=1e-2)
    out = imagebind([path])
    torch.testing.assert_close(
        out[..., :198], torch.full_like(out[..., :198], SILENCE_VALUE), atol=1e-4, rtol=0
    )


def _nan_wav(path: Path) -> None:
    data = np.sin(np.arange(8000, dtype=np.float32) / 10)
    data[100] = np.nan
    sf.write(path, data, 8000, subtype="FLOAT")


def _inf_wav(path: Path) -> None:
    data = np.zeros(8000, dtype=np.float32)
    data[7] = np.inf
    sf.write(path, data, 8000, subtype="FLOAT")


def _truncated_wav(path: Path) -> None:
    sf.write(path, np.zeros(8000, dtype=np.float32), 8000)
    path.write_bytes(path.read_bytes()[:30])


def _truncated_flac(path: Path) -> None:
    # A WAV cut inside its data still decodes (fewer samples); a cut FLAC stream does not.
    noise = np.random.default_rng(2).normal(0, 0.1, 16000).astype(np.float32)
    sf.write(path, noise, 16000, format="FLAC")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("make", "problem", "reason"),
    [
        (
            lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
            "cannot be read",
            "unreadable",
        ),
        (lambda p: p.write_bytes(b""), "empty file", "empty"),
        (lambda p: sf.write(p, np.zeros(0, dtype=np.float32), 8000), "no samples", "empty"),
        (_nan_wav, "NaN or infinite", "nan"),
        (_inf_wav, "NaN or infinite", "nan"),
        (_truncated_wav, "cannot be read", "unreadable"),
        (_truncated_flac, "cannot be read", "unreadable"),
    ],
    ids=["corrupt", "zero-bytes", "no-samples", "nan", "inf", "truncated-header", "truncated-flac"],
)
def test_bad_files_raise_audio_read_error(tmp_path, make, problem, reason):
    path = tmp_path / "bad_input.wav"
    make(path)
    with pytest.raises(audio.AudioReadError, match=problem) as info:
        audio.read_audio(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.reason == reason
    copied = pickle.loads(pickle.dumps(info.value))  # e.g. from a DataLoader worker
    assert (copied.reason, str(copied)) == (reason, str(info.value))
    good = tmp_path / "good.wav"
    sf.write(good, np.random.default_rng(1).normal(0, 0.1, 8000).astype(np.float32), 8000)
    with pytest.raises(audio.AudioReadError, match="bad_input"):
        audio.load_and_transform_audio([good] * 40 + [path], num_workers=2)


def test_missing_file_raises_audio_read_error(tmp_path):
    with pytest.raises(audio.AudioReadError, match="nowhere.wav") as info:
        audio.read_audio(tmp_path / "nowhere.wav")
    assert info.value.reason == "missing"


def test_file_objects(tmp_path):
    data = np.random.default_rng(3).normal(0, 0.1, 24000).astype(np.float32)
    path = tmp_path / "clip.flac"
    sf.write(path, data, 16000)
    blob = io.BytesIO(path.read_bytes())
    blob.name = "shard-0/clip.flac"
    out = audio.load_and_transform_audio([blob])
    torch.testing.assert_close(out, audio.load_and_transform_audio([path]), atol=0, rtol=0)
    corrupt = io.BytesIO(b"RIFF not really")
    corrupt.name = "shard-0/broken.wav"
    with pytest.raises(audio.AudioReadError, match="shard-0/broken.wav"):
        audio.read_audio(corrupt)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_survives_fork(fsdd):
    # DataLoader workers are forked after the parent may have used the thread pool; the child
    # must start its own threads instead of queueing work for threads it does not have.
    files = fsdd[:12]
    expected = audio.load_and_transform_audio(files, num_workers=2)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        same = False
        try:
            signal.alarm(60)  # never leave a hung child behind
            # As DataLoader workers do: OpenMP's thread team does not survive fork.
            torch.set_num_threads(1)
            same = torch.equal(audio.load_and_transform_audio(files, num_workers=2), expected)
        finally:
            os._exit(0 if same else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    ("suffix", "subtype"), [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", None)]
)
@pytest.mark.parametrize("compat", ["default", "imagebind"])
def test_formats(fsdd, tmp_path, suffix, subtype, compat):
    data, rate = concat_fsdd(fsdd, 2.5)
    path = tmp_path / f"clip.{suffix}"
    sf.write(path, data, rate, subtype=subtype)
    out = imagebind([path], compat=compat)
    assert out.shape == (1, 3, 1, 128, 204)
    assert torch.isfinite(out).all()
    if suffix != "ogg":  # lossless: the same features as the WAV written the same way
        wav_path = tmp_path / "ref.wav"
        sf.write(wav_path, data, rate, subtype="PCM_16")
        torch.testing.assert_close(out, imagebind([wav_path], compat=compat), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("suffix", "subtype"),
    [
        ("wav", "PCM_U8"),
        ("wav", "PCM_16"),
        ("wav", "PCM_24"),
        ("wav", "PCM_32"),
        ("flac", "PCM_S8"),
        ("flac", "PCM_16"),
        ("flac", "PCM_24"),
        ("aiff", "PCM_16"),
        ("aiff", "PCM_32"),
    ],
)
@pytest.mark.parametrize("channels", [1, 2])
def test_integer_pcm_reads_equal_libsndfile_float(tmp_path, suffix, subtype, channels):
    # read_audio reads integer PCM as integers and scales it itself; the numbers must be the
    # ones soundfile gives for dtype="float32", extremes included.
    rng = np.random.default_rng(channels)
    data = rng.uniform(-1, 1, (3000, channels))
    data[:2] = [[-1.0] * channels, [1 - 1e-9] * channels]
    path = tmp_path / f"clip.{suffix}"
    sf.write(path, data, 44100, subtype=subtype)
    expected, _ = sf.read(str(path), dtype="float32", always_2d=True)
    wav, rate = audio.read_audio(path)
    assert rate == 44100 and wav.dtype == torch.float32
    assert np.array_equal(wav.numpy(), expected.T)


def test_spec_augment_masks_one_band_per_clip():
    feats = torch.randn(4, 3, 1, 128, 204) + 5  # no zeros before masking
    generator = torch.Generator().manual_seed(0)
    masked = audio.spec_augment(feats, freq_mask=12, generator=generator)
    assert masked.shape == feats.shape
    assert (feats != 0).all(), "input must not be modified"
    saw_mask = False
    for original, clip in zip(feats.reshape(-1, 128, 204), masked.reshape(-1, 128, 204)):
        rows = (clip == 0).all(dim=1).nonzero().flatten()
        assert len(rows) <= 12
        if len(rows):
            saw_mask = True
            assert rows.max() - rows.min() + 1 == len(rows), "one contiguous band"
        kept = (clip != 0).all(dim=1)
        assert torch.equal(clip[kept], original[kept])
        assert ((clip == 0).any(dim=1) == (clip == 0).all(dim=1)).all(), "whole rows only"
    assert saw_mask
    timed = audio.spec_augment(feats, freq_mask=0, time_mask=20, generator=generator)
    columns = (timed.reshape(-1, 128, 204) == 0).all(dim=1).sum(dim=1)
    assert columns.max() <= 20 and columns.max() > 0
    assert torch.equal(audio.spec_augment(feats, freq_mask=0), feats)


def test_preprocess_bench_reports_identical_output(fsdd):
    # The speed figures come from bench/audio_preprocess.py; here only its output contract and
    # the equality it checks (timings on a shared machine are not asserted).
    repo = Path(__file__).resolve().parents[1]
    cmd = ["bench/audio_preprocess.py", str(RECORDINGS), "--limit", "12", "--repeat", "1"]
    proc = run_script(cmd, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["files"] == 12 and result["clips"] == 36
    assert result["max_abs_diff"] == 0.0
    for key in ("clips_per_second", "reference_clips_per_second", "ratio"):
        assert result[key] > 0
    assert result["ratio_median_of_rounds"] == result["ratio"]  # one round: the same ratio


def test_compare_bench_checks_output_against_a_revision(fsdd):
    # bench/audio_compare.py times this checkout against a git revision's audio module; here
    # against HEAD, whose output must be identical (timings are not asserted).
    repo = Path(__file__).resolve().parents[1]
    cmd = ["bench/audio_compare.py", "HEAD", str(RECORDINGS), "--limit", "6", "--rounds", "1"]
    proc = run_script(cmd, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])[str(RECORDINGS)]
    assert result["files"] == 6 and result["speedup"] > 0
    assert "outputs identical" in proc.stdout


def test_make_long_audio_writes_esc50_shaped_files(fsdd, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cmd = ["bench/make_long_audio.py", str(RECORDINGS), str(tmp_path), "--count", "2"]
    proc = run_script(cmd, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(tmp_path.glob("*.wav"))
    assert [p.name for p in written] == ["000.wav", "001.wav"]
    for path in written:
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.frames) == (44100, 1, 5 * 44100)
        assert info.subtype == "PCM_16"
    # Not silence: real recordings joined end to end.
    assert np.abs(sf.read(str(written[0]))[0]).max() > 0.05


def speech(rate: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """Real speech at ``rate``: FSDD digits joined and resampled, with a DC offset."""
    files = sorted(RECORDINGS.glob("*.flac"))[seed * 40 : (seed + 1) * 40]
    data, source_rate = concat_fsdd(files, min(seconds, 15.0) + 0.01)
    wave = AF.resample(torch.from_numpy(data), source_rate, rate)
    repeats = int(seconds * rate) // wave.numel() + 1  # beyond the 40 files' length: loop them
    return wave.repeat(repeats)[: int(seconds * rate)] + 0.05


# (rate, mel bins): ImageBind's; the FFT buffer laid out with the energies beside the power
# spectrum or, when they do not fit (8 kHz, 256 bins), in a buffer of their own; other FFT
# sizes (22.05, 32 and 44.1 kHz), where the mel product may be dense.
FBANK_SHAPES = [(16000, 128), (8000, 128), (8000, 256), (22050, 64), (32000, 128), (44100, 128)]


@pytest.mark.parametrize(("rate", "mel_bins"), FBANK_SHAPES)
def test_fbank_equals_reference(rate, mel_bins):
    # Shorter than one window (padded to one frame), fewer frames than the banded product
    # takes, one clip, and a clip whose frames fill several fbank groups.
    for seconds in (0.01, 0.1, 2.0, 12.5):
        clip = speech(rate, seconds)
        for target in (204, 1300):
            expected = audio_reference.fbank(clip, rate, mel_bins, target)
            got = audio.fbank(clip, rate, mel_bins, target)
            assert got.shape == (1, mel_bins, target)
            assert torch.equal(got, expected), (rate, mel_bins, seconds, target)


def test_fbank_matches_kaldi():
    clip = speech(16000, 2.0)
    expected = _kaldi_fbank((clip - clip.mean()).unsqueeze(0))
    out = audio.fbank(clip)
    assert out.shape == (1, 128, 204)
    normalised = (expected - audio.IMAGEBIND_MEAN) / audio.IMAGEBIND_STD
    assert torch.equal(out[0, :, :198], normalised)
    torch.testing.assert_close(out[0, :, 198:], torch.full((128, 6), PAD_VALUE))
    # Shorter than one 25 ms window: zero-padded to one frame instead of failing in kaldi.
    assert torch.isfinite(audio.fbank(torch.randn(100))).all()


def test_fbank_exact_as_buffers_grow_shrink_and_change_rate():
    # The fbank keeps per-thread buffers, laid out per frame length, and slices of them per
    # group size; a bigger group replaces the buffers, another rate lays them out anew, and
    # nothing left over from one call may leak into the next.
    short, long_clip = speech(16000, 0.6), speech(16000, 40.0, seed=1)
    other_rate = speech(32000, 3.0, seed=2)
    calls = [
        (short, 16000, 204),
        (long_clip, 16000, 4000),
        (short, 16000, 204),
        (other_rate, 32000, 300),
        (short, 16000, 204),
        (speech(8000, 1.0), 8000, 204),
        (long_clip, 16000, 4000),
    ]
    for clip, rate, target in calls:
        expected = audio_reference.fbank(clip, rate, 128, target)
        assert torch.equal(audio.fbank(clip, rate, 128, target), expected), (rate, target)


def test_load_and_transform_exact_as_chunks_grow_and_shrink(fsdd, recordings):
    # One worker: every call reuses that thread's buffers, which grow for the many-file call.
    calls = [fsdd[:1], fsdd[:40] + recordings[-4:], fsdd[:1], recordings[-3:], fsdd[:2]]
    for files in calls:
        assert torch.equal(imagebind(files, num_workers=1), reference(files, compat="imagebind"))


# Short, odd and 10 s lengths, and (below) the two sides of torch's switch from its own GEMM
# convolution to oneDNN for one signal, at 20480 padded samples in torch 2.14.
RESAMPLE_LENGTHS = (1, 40, 401, 4807, 16385, 48001, 160003)


def _resample_lengths(orig: int) -> list[int]:
    module = torchaudio.transforms.Resample(orig, 16000)
    padding = 2 * module.width + module.orig_freq // module.gcd
    return [*RESAMPLE_LENGTHS, 20480 - padding, 20481 - padding]


@pytest.mark.parametrize("orig", [48000, 32000, 8000, 24000, 44100, 22050])
def test_resample_equals_torchaudio_bit_for_bit(orig):
    # Three calls per shape: the engine may switch kernels once it has seen a shape before.
    generator = torch.Generator().manual_seed(orig)
    default_mode = torchaudio.transforms.Resample(orig, 16000)
    for length in _resample_lengths(orig):
        for channels in (1, 2):
            for _ in range(3):
                x = torch.randn(channels, length, generator=generator)
                got = audio.resample(x, orig, 16000, imagebind=True)
                assert torch.equal(got, AF.resample(x, orig, 16000)), (orig, length, channels)
                assert torch.equal(audio.resample(x, orig, 16000), default_mode(x))


@pytest.mark.parametrize("orig", [48000, 8000, 44100])
def test_resample_real_audio_equals_reference(orig):
    # Real recordings, 1-D and [channels, samples], repeated so that a second sight of each
    # shape is covered, at ImageBind's float32 kernel and the transform's float64 one.
    wave = speech(orig, 10.0)
    for x in (wave, torch.stack([wave, wave.flip(0)]), wave[: orig // 3]):
        for imagebind_kernel in (True, False):
            expected = audio_reference.resample(x, orig, 16000, imagebind_kernel)
            for _ in range(3):
                assert torch.equal(audio.resample(x, orig, 16000, imagebind_kernel), expected)
    assert audio.resample(wave, orig, orig) is wave
