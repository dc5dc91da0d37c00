"""Bind several modalities to the frozen CLIP anchor in one run: one space, one bound model.

accelerate launch train/bind.py [--resume] [field=value ...]     # configs/bind.yaml
python train/bind.py --from RUN_A RUN_B --out DIR                  # combine runs, one anchor
"""

import sys

from imagebind_lite.cli import bind_main

if __name__ == "__main__":
    bind_main(sys.argv[1:])
