"""Align an audio encoder to the frozen CLIP anchor.

accelerate launch train/align_audio.py [--resume] [field=value ...]
"""

from imagebind_lite.cli import train_main

if __name__ == "__main__":
    train_main("audio.yaml")
