from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="imagebind_lite",
    version="0.1.0",
    description="Bind new sensor modalities (audio, depth, thermal, ...) to a frozen CLIP anchor.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level configs/ folder ships inside the package as imagebind_lite.configs, so the
    # scripts find their configs the same way in a checkout and after a plain install.
    packages=find_packages(include=["imagebind_lite", "imagebind_lite.*"])
    + ["imagebind_lite.configs"],
    package_dir={"imagebind_lite.configs": "configs"},
    include_package_data=True,
    package_data={"imagebind_lite": ["assets/**/*"], "imagebind_lite.configs": ["*.yaml"]},
    install_requires=[
        # Upper bound: never let a resolver pull a newer (multi-GB CUDA) torch.
        "torch>=2.1,<=2.14.1",
        "torchvision",
        "torchaudio",
        "timm>=1.0",
        "einops",
        "accelerate>=0.30",
        "soundfile",
        "open_clip_torch>=3.0",  # the version tested here is 3.3
        "safetensors",
        "huggingface_hub>=0.25",  # bound models by hf-hub: name (open_clip needs it anyway)
        "pyyaml",
        "tqdm",
        "tensorboard",
        "pillow",
        "numpy",
        "webdataset",  # tar shards for CLIP-scale data
    ],
    extras_require={
        "video": ["av"],  # train/prepare_videos.py
        "nyud": ["h5py", "scipy"],  # train/prepare_nyud.py reads the official .mat files
        "sunrgbd": ["scipy"],  # the toolbox's allsplit.mat
        "dev": ["pytest", "pytest-xdist", "ruff", "matplotlib", "av", "h5py", "scipy"],
    },
)
