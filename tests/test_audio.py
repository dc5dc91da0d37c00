"""Audio preprocessing: ImageBind-exact mode, options, bad input, formats, augmentation."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
import torchaudio.functional as AF
from torchaudio.compliance import kaldi

from imagebind_lite.data import audio, audio_reference

FSDD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fsdd" / "recordings"
PAD_VALUE = (0 - audio.IMAGEBIND_MEAN) / audio.IMAGEBIND_STD  # 0.467
SILENCE_VALUE = (
    float(np.log(np.finfo(np.float32).eps)) - audio.IMAGEBIND_MEAN
) / audio.IMAGEBIND_STD


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


def imagebind_reference(path: Path) -> torch.Tensor:
    """ImageBind's recipe written out plainly, one file, one clip at a time: [3, 1, 128, 204]."""
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


def imagebind(paths, **options) -> torch.Tensor:
    """load_and_transform_audio in imagebind mode unless told otherwise, padding warnings off."""
    options.setdefault("compat", "imagebind")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", audio.AudioPaddingWarning)
        return audio.load_and_transform_audio(paths, **options)


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    # On a shared 2-core machine, torch's OpenMP threads spinning against other jobs make the
    # per-clip reference and inline calls 10-50x slower; these tests check values, not speed.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fsdd() -> list[Path]:
    if not FSDD.is_dir():
        pytest.skip(f"{FSDD} not available")
    files = sorted(FSDD.glob("*.wav"))[:40]
    if len(files) < 10:
        pytest.skip(f"too few files in {FSDD}")
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


@pytest.fixture(scope="module")
def long_file(fsdd, tmp_path_factory) -> Path:
    """5.5 s with a DC offset: ImageBind's three 2 s clips overlap (0-2, 1.75-3.75, 3.5-5.5)."""
    data, rate = concat_fsdd(fsdd, 5.5)
    path = tmp_path_factory.mktemp("audio") / "long_dc.wav"
    sf.write(path, data * 0.5 + 0.3, rate, subtype="FLOAT")
    return path


def test_imagebind_exact_on_short_fsdd_clips(fsdd):
    files = fsdd[:6]
    durations = [sf.info(str(p)).duration for p in files]
    assert min(durations) < 2.0
    out = imagebind(files)
    assert out.shape == (6, 3, 1, 128, 204)
    expected = torch.stack([imagebind_reference(p) for p in files])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    # A file under 2 s: three clips of the whole file, few frames, padded with 0.467.
    frames = 1 + (int(durations[0] * 16000) - 400) // 160
    assert frames < 204
    torch.testing.assert_close(
        out[0, :, :, :, frames:], torch.full_like(out[0, :, :, :, frames:], PAD_VALUE)
    )
    assert not torch.allclose(out[0, 0, 0, :, frames - 1], torch.tensor(PAD_VALUE))
    torch.testing.assert_close(out[0, 0], out[0, 1], atol=1e-4, rtol=0)


def test_clips_of_few_frames_exact_when_batched(fsdd, tmp_path):
    # 25-45 ms files: one to three frames, whose mel product the BLAS sums in another order
    # than a group's; batched with ordinary files they must still equal the per-clip recipe.
    data, rate = sf.read(str(fsdd[0]), dtype="float32")
    short = []
    for samples in (210, 300, 360):
        short.append(tmp_path / f"short_{samples}.wav")
        sf.write(short[-1], data[1000 : 1000 + samples], rate)
    files = [*fsdd[:4], *short]
    out = imagebind(files)
    assert torch.equal(out, torch.stack([imagebind_reference(p) for p in files]))
    default = audio.load_and_transform_audio(files)
    one_by_one = torch.stack([audio.load_and_transform_audio([p])[0] for p in files])
    assert torch.equal(default, one_by_one)


def test_reference_module_is_imagebinds_recipe_and_the_pipelines_output(fsdd, long_file):
    for path in [*fsdd[:3], long_file]:
        expected = audio_reference.load_and_transform_audio([path], compat="imagebind")[0]
        assert torch.equal(expected, imagebind_reference(path))
        assert torch.equal(expected, imagebind([path])[0])
        default = audio_reference.load_and_transform_audio([path])[0]
        assert torch.equal(default, audio.load_and_transform_audio([path])[0])


def test_imagebind_overlap_quirk_on_long_file(long_file):
    out = imagebind([long_file])
    assert out.shape == (1, 3, 1, 128, 204)
    torch.testing.assert_close(out[0], imagebind_reference(long_file), atol=1e-4, rtol=0)
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
    torch.testing.assert_close(out[0], imagebind_reference(path), atol=1e-4, rtol=0)
    # Default mode mixes both channels down; ImageBind keeps channel 0.
    assert (audio.load_and_transform_audio([path]) - out).abs().max() > 1e-2
    # ImageBind's fbank sees only channel 0, but its in-place shift is the mean over both
    # channels: the first clip matches the left channel alone, the overlapping ones do not.
    left_only = tmp_path / "left.wav"
    sf.write(left_only, left, rate, subtype="FLOAT")
    diff = (imagebind([left_only]) - out).abs().amax(dim=(0, 2, 3, 4))
    assert diff[0] < 1e-3
    assert diff[1:].max() > 1e-2


@pytest.mark.parametrize(
    ("rate", "seconds", "channels"),
    [(16000, 10, 2), (16000, 7, 1), (16000, 14, 1), (48000, 10, 1)],
)
def test_imagebind_exact_when_clips_do_not_overlap(fsdd, tmp_path, rate, seconds, channels):
    # From 6 s on, ImageBind's clips are apart and are used as views of the waveform (up to
    # twice the clips' length; 14 s takes copies); 16 kHz needs no resampling, 48 kHz the
    # wide resampling kernel.
    data, source_rate = concat_fsdd(fsdd, seconds)
    wave = AF.resample(torch.from_numpy(data), source_rate, rate).numpy()
    if channels == 2:
        wave = np.stack([wave, 0.5 * wave[::-1] + 0.2], axis=1)
    path = tmp_path / f"{rate}_{seconds}s.wav"
    sf.write(path, wave + 0.1, rate, subtype="FLOAT")
    out = imagebind([path])[0]
    if channels == 1:
        assert torch.equal(out, imagebind_reference(path))
    else:  # a mean over two channels' clip is a threaded sum in ImageBind (module docstring)
        torch.testing.assert_close(out, imagebind_reference(path), atol=1e-4, rtol=0)


def test_imagebind_warns_on_heavy_padding(fsdd):
    with pytest.warns(audio.AudioPaddingWarning, match=fsdd[0].name):
        audio.load_and_transform_audio(fsdd[:1], compat="imagebind")
    with warnings.catch_warnings():
        warnings.simplefilter("error", audio.AudioPaddingWarning)
        audio.load_and_transform_audio(fsdd[:1])


def test_workers_and_batching_do_not_change_output(fsdd):
    files = fsdd[:12]
    serial = imagebind(files, num_workers=1)
    torch.testing.assert_close(imagebind(files, num_workers=3), serial, atol=0, rtol=0)
    one_by_one = torch.stack([audio.waveform_to_clips(*audio.read_audio(p)) for p in files])
    torch.testing.assert_close(audio.load_and_transform_audio(files), one_by_one)


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
    torch.testing.assert_close(single, imagebind_reference(path), atol=1e-4, rtol=0)


def test_waveform_to_clips_imagebind_does_not_modify_input(long_file):
    wav, sr = audio.read_audio(long_file)
    wav = audio.resample(wav, sr, 16000, imagebind=True)
    before = wav.clone()
    clips = audio.waveform_to_clips(wav, 16000, {"compat": "imagebind"})
    assert torch.equal(wav, before)
    torch.testing.assert_close(clips, imagebind([long_file])[0], atol=1e-4, rtol=0)


def test_waveform_to_clips_accepts_1d_and_float64(long_file):
    wav, sr = audio.read_audio(long_file)
    expected = audio.waveform_to_clips(wav, sr)
    torch.testing.assert_close(audio.waveform_to_clips(wav[0], sr), expected, atol=0, rtol=0)
    torch.testing.assert_close(audio.waveform_to_clips(wav.double(), sr), expected, atol=0, rtol=0)


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
    torch.testing.assert_close(cropped, imagebind([long_file], **base)[..., :100])
    with pytest.raises(ValueError, match="compat"):
        audio.load_and_transform_audio([long_file], compat="bogus")


def test_fbank_matches_kaldi():
    torch.manual_seed(0)
    clip = torch.randn(32000) * 0.1 + 0.05
    expected = _kaldi_fbank((clip - clip.mean()).unsqueeze(0))
    out = audio.fbank(clip)
    assert out.shape == (1, 128, 204)
    torch.testing.assert_close(
        out[0, :, :198], (expected - audio.IMAGEBIND_MEAN) / audio.IMAGEBIND_STD, atol=1e-5, rtol=0
    )
    # Shorter than one 25 ms window: zero-padded to one frame instead of failing in kaldi.
    assert torch.isfinite(audio.fbank(torch.randn(100))).all()


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
    cmd = [sys.executable, "bench/audio_preprocess.py", str(FSDD), "--limit", "12", "--repeat", "1"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
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
    cmd = [sys.executable, "bench/audio_compare.py", "HEAD", str(FSDD)]
    cmd += ["--limit", "6", "--rounds", "1"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])[str(FSDD)]
    assert result["files"] == 6 and result["speedup"] > 0
    assert "outputs identical" in proc.stdout


def test_make_long_audio_writes_esc50_shaped_files(fsdd, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "bench/make_long_audio.py", str(FSDD), str(tmp_path), "--count", "2"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(tmp_path.glob("*.wav"))
    assert [p.name for p in written] == ["000.wav", "001.wav"]
    for path in written:
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.frames) == (44100, 1, 5 * 44100)
        assert info.subtype == "PCM_16"
    # Not silence: real recordings joined end to end.
    assert np.abs(sf.read(str(written[0]))[0]).max() > 0.05


@pytest.fixture
def mel_plan_reprobed():
    audio._banded_mel_plan.cache_clear()
    yield
    audio._banded_mel_plan.cache_clear()


def test_banded_mel_product_equals_dense_product_bit_for_bit(fsdd, mel_plan_reprobed):
    plan = audio._banded_mel_plan(16000, 128)
    if plan is None:
        pytest.skip("this BLAS sums the banded product differently: the dense product is used")
    mel_major, steps = plan
    # Real power spectra: frames of spoken digits as kaldi windows them.
    size, shift, padded, window, banks_t = audio._fbank_constants(16000, 128)
    wav, rate = audio.read_audio(fsdd[0])
    signal = audio.resample(wav, rate, 16000, imagebind=True)[0]
    frames = audio._frames(signal - signal.mean(), size, shift)
    frames = (frames - frames.mean(dim=1, keepdim=True)) * window
    power = torch.fft.rfft(frames, n=padded).abs().pow(2)
    assert power.shape[0] >= audio._MEL_MIN_ROWS
    for layout in {mel_major, False}:  # the chosen layout, and frame-major (kaldi's)
        assert audio._banded_equals_dense(power, banks_t, steps, layout)
    covered = sum(bins * filters for _, filters, spans in steps for _, bins, _ in spans)
    assert covered < banks_t.numel() / 3  # the point of it: a fraction of the dense work


def test_features_identical_with_and_without_banded_mel(
    fsdd, tmp_path, monkeypatch, mel_plan_reprobed
):
    data, rate = concat_fsdd(fsdd, 5.0)
    path = tmp_path / "esc50_like.wav"
    sf.write(
        path, AF.resample(torch.from_numpy(data), rate, 44100).numpy(), 44100, subtype="PCM_16"
    )
    files = [path, *fsdd[:3]]
    fast = imagebind(files)
    monkeypatch.setattr(audio, "_MEL_MAJOR_CANDIDATES", (False,))  # frame-major products
    audio._banded_mel_plan.cache_clear()
    if audio._banded_mel_plan(16000, 128) is not None:
        assert torch.equal(imagebind(files), fast)
    monkeypatch.setattr(audio, "_MEL_SPLIT_CANDIDATES", ())  # no candidate passes: dense
    audio._banded_mel_plan.cache_clear()
    assert audio._banded_mel_plan(16000, 128) is None
    dense = imagebind(files)
    assert torch.equal(fast, dense)
    assert torch.equal(dense[0], imagebind_reference(path))


def test_log_mel_workspace_survives_growing_and_shrinking_groups(fsdd):
    # The fbank keeps per-thread buffers and slices of them per group size; a bigger group
    # replaces the buffers, and slices made for the old ones must not be reused.
    signals = []
    for path in fsdd[:3]:
        wav, rate = audio.read_audio(path)
        signal = audio.resample(wav, rate, 16000, imagebind=True)[0]
        signals.append(signal - signal.mean())
    size, shift, *_ = audio._fbank_constants(16000, 128)
    small = [audio._frames(signals[0], size, shift)]
    big = [audio._frames(s, size, shift) for s in signals] * 40  # > any earlier buffer
    expected_small = _kaldi_fbank(signals[0].unsqueeze(0))
    first = audio._log_mel(small, 16000, 128).clone()
    grown = audio._log_mel(big, 16000, 128).clone()
    again = audio._log_mel(small, 16000, 128).clone()
    assert torch.equal(first, expected_small) and torch.equal(again, expected_small)
    expected_big = torch.cat([_kaldi_fbank(s.unsqueeze(0)) for s in signals] * 40, dim=1)
    assert torch.equal(grown, expected_big)


def test_log_mel_exact_after_another_sample_rate_in_the_same_thread():
    # Each frame length lays the shared FFT buffer out differently; the zero padding of one
    # must not be left holding samples written for another.
    generator = torch.Generator().manual_seed(0)
    clip_16k = torch.randn(32000, generator=generator) * 0.1
    clip_32k = torch.randn(8000, generator=generator) * 0.1

    def log_mel(clip, rate):
        size, shift, *_ = audio._fbank_constants(rate, 128)
        return audio._log_mel([audio._frames(clip - clip.mean(), size, shift)], rate, 128).clone()

    expected = _kaldi_fbank((clip_16k - clip_16k.mean()).unsqueeze(0))
    assert torch.equal(log_mel(clip_16k, 16000), expected)
    log_mel(clip_32k, 32000)
    assert torch.equal(log_mel(clip_16k, 16000), expected)


@pytest.mark.parametrize(
    ("rate", "mel_bins"), [(8000, 128), (8000, 256), (22050, 64), (44100, 128)]
)
def test_log_mel_exact_at_other_rates_and_mel_bins(rate, mel_bins):
    # The fbank stores the power spectrum and energies in the FFT input buffer when they fit
    # beside each other (16 kHz, 128 bins) and in a buffer of their own when they do not
    # (8 kHz: 129 + 128 > 256); both layouts must equal kaldi bit for bit.
    clip = torch.randn(rate * 2, generator=torch.Generator().manual_seed(rate)) * 0.1
    clip -= clip.mean()
    size, shift, *_ = audio._fbank_constants(rate, mel_bins)
    got = audio._log_mel([audio._frames(clip, size, shift)] * 2, rate, mel_bins)
    expected = _kaldi_fbank(clip.unsqueeze(0), rate, mel_bins)
    assert torch.equal(got, torch.cat([expected, expected], dim=1))


# Short, odd and 10 s lengths, and (below) the two sides of torch's switch from its own GEMM
# convolution to oneDNN for one signal, at 20480 padded samples in torch 2.14.
RESAMPLE_LENGTHS = (1, 40, 401, 4807, 48001, 160003)


def _resample_lengths(module) -> list[int]:
    padding = 2 * module.width + module.orig_freq // module.gcd
    return [*RESAMPLE_LENGTHS, 20480 - padding, 20481 - padding]


@pytest.mark.parametrize("orig", [48000, 32000, 8000, 24000, 44100])
def test_resample_equals_torchaudio_bit_for_bit(orig):
    # Where the wide (several conv steps at once) kernel is used, it must not move a bit.
    generator = torch.Generator().manual_seed(orig)
    default_mode = torchaudio.transforms.Resample(orig, 16000)
    for length in _resample_lengths(audio._resampler(orig, 16000, True)):
        for channels in (1, 2):
            x = torch.randn(channels, length, generator=generator)
            got = audio.resample(x, orig, 16000, imagebind=True)
            assert torch.equal(got, AF.resample(x, orig, 16000)), (orig, length, channels)
            assert torch.equal(audio.resample(x, orig, 16000), default_mode(x))


@pytest.mark.parametrize("orig", [48000, 8000])
def test_wide_resampling_kernel_equals_torchaudios(orig):
    module = audio._resampler(orig, 16000, True)
    wide = audio._polyphase_kernel(orig, 16000, True)
    if wide is None:
        pytest.skip("oneDNN on this CPU sums the wide kernel in another order; it is not used")
    assert wide[0].shape[0] == 16  # one full block of output channels
    generator = torch.Generator().manual_seed(1)
    for length in _resample_lengths(module):
        x = torch.randn(2, length, generator=generator)  # two signals: oneDNN at any length
        direct = audio._convolve(x, module)
        assert torch.equal(audio._convolve(x, module, wide)[:, : direct.shape[1]], direct)
