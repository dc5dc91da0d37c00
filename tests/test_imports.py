"""``import imagebind_lite`` stays cheap: open_clip, timm and torchvision (seconds of imports,
torchvision's model zoo and torch._dynamo among them) load only when an anchor or an encoder is
built. Each check runs a fresh interpreter: this test's own process has imported them already."""

import json

from conftest import run_python

HEAVY = ("open_clip", "timm", "torchvision")

FRESH = f"""
import json, sys
import imagebind_lite, imagebind_lite.cli
heavy = {HEAVY!r}
out = {{"after_import": [m for m in heavy if m in sys.modules]}}

from imagebind_lite.anchor import Anchor
from imagebind_lite.config import AnchorConfig
from imagebind_lite.models.anchor_init import anchor_architecture
from imagebind_lite.models.build import build_encoder

out["after_from_imports"] = [m for m in heavy if m in sys.modules]
encoder = build_encoder("depth", 32)
out["after_encoder"] = [m for m in heavy if m in sys.modules]
anchor = Anchor(AnchorConfig(pretrained=None))
out["after_anchor"] = [m for m in heavy if m in sys.modules]
out["text"] = list(anchor.encode_text(["a photo of a digit"]).shape)
out["embed_dim"] = anchor.embed_dim
out["width"] = anchor_architecture(anchor.model.visual)["width"]
print(json.dumps(out))
"""


def test_package_imports_without_open_clip_timm_torchvision_and_loads_them_when_needed():
    proc = run_python(["-c", FRESH], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["after_import"] == []
    assert out["after_from_imports"] == []  # importing the modules is not building anything
    assert "timm" in out["after_encoder"]  # the encoder's blocks use timm's Mlp and DropPath
    assert out["after_anchor"] == list(HEAVY)
    assert out["text"] == [1, out["embed_dim"]]
    assert out["width"] > 0
