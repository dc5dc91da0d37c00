"""Fine-tune the CLIP anchor's image and text towers on a domain's image-caption pairs.

    accelerate launch train/finetune_anchor.py [--config FILE] [field=value ...]

    # the shipped anchor (imagebind_lite/assets/anchors/tiny-clip-digits-scenes.safetensors) is
    # the defaults: trainable=full on digits + scenes from random weights, 30 epochs, seed 0
    accelerate launch train/finetune_anchor.py

    # LoRA on top of the shipped anchor
    python train/finetune_anchor.py trainable=lora epochs=5 \
        anchor.pretrained=imagebind_lite:tiny-clip-digits-scenes output=runs/anchor/lora.safetensors

    # your own domain: a manifest of image,caption rows (paths relative to its folder), held-out
    # pairs from a split column or a second manifest
    python train/finetune_anchor.py trainable=last_n last_n=1 \
        anchor.pretrained=imagebind_lite:tiny-clip-digits-scenes \
        'domains=[{name: mine, manifest: data/pairs.csv, eval_manifest: data/test.csv}]'

Then align with the new anchor: ``anchor.pretrained=OUTPUT`` (the report OUTPUT.json says the
exact fields). Anchor caches of the old anchor are refused: rebuild them (train/cache_anchor.py).
"""

import json

from imagebind_lite.anchor_finetune import FinetuneConfig, finetune_anchor
from imagebind_lite.cli import OneLineArgumentParser, one_line_errors
from imagebind_lite.config import load_config

if __name__ == "__main__":
    parser = OneLineArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Fields: see FinetuneConfig in imagebind_lite/anchor_finetune.py",
    )
    parser.add_argument("--config", help="YAML config (fields of FinetuneConfig)")
    parser.add_argument(
        "overrides", nargs="*", help="field=value, e.g. epochs=10 trainable=lora lora_rank=4"
    )
    args = parser.parse_args()
    with one_line_errors():
        cfg = load_config(args.config, args.overrides, cls=FinetuneConfig)
        result = finetune_anchor(cfg)
    print(json.dumps(result, indent=2))
