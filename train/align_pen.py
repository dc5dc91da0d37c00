"""Align a pen-trajectory encoder to the frozen CLIP anchor.

accelerate launch train/align_pen.py [--resume] [field=value ...]
"""

from imagebind_lite.cli import train_main

if __name__ == "__main__":
    train_main("pen.yaml")
