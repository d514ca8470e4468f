"""granvit-export-encoder: the exported ViT loads with stock transformers (no remote code, no granvit package) and
gives exactly GranViT's patch features."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from granvit import GranViTForConditionalGeneration, GranViTProcessor
from granvit.hub.export_encoder import main as export_main
from granvit.train.build import save_granvit
from PIL import Image
from transformers import SiglipVisionModel

STOCK_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["granvit"] = None  # stock transformers only
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    out, inputs, result = sys.argv[1], sys.argv[2], sys.argv[3]
    encoder = AutoModel.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    pixel_values = torch.load(inputs)
    with torch.no_grad():
        hidden = encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    torch.save({
        "class": type(encoder).__name__, "module": type(encoder).__module__, "processor": type(processor).__name__,
        "hidden": hidden,
        "stock_pixels": processor(images=Image.open(sys.argv[4]), return_tensors="pt")["pixel_values"],
    }, result)
    """
)


def test_exported_encoder_equals_granvit_tower_in_stock_transformers(
    tiny_model_and_processor, tiny_checkpoint, tmp_path
):
    model, processor = tiny_model_and_processor
    out = tmp_path / "granvit-vit"
    export_main([str(tiny_checkpoint), str(out)])
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["SiglipVisionModel"]
    assert "pad" in (out / "README.md").read_text().lower()

    size = processor.image_processor.image_size
    square = Image.effect_noise((size, size), 60).convert("RGB")  # already at model resolution: no resize differences
    square.save(tmp_path / "square.png")
    pixel_values = processor.image_processor([square, Image.new("RGB", (90, 40), "red")])["pixel_values"]
    torch.save(pixel_values, tmp_path / "inputs.pt")
    done = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "result.pt"),
         str(tmp_path / "square.png")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=dict(os.environ), check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert (result["class"], result["processor"]) == ("SiglipVisionModel", "SiglipImageProcessor")
    assert result["module"].startswith("transformers.models.siglip")
    with torch.no_grad():
        reference = model.model.get_patch_features(pixel_values)  # (2, grid, grid, hidden)
    assert torch.equal(result["hidden"], reference.flatten(1, 2))
    # The stock processor matches GranViT's on a square image (GranViT's pad-to-square is then a no-op).
    torch.testing.assert_close(result["stock_pixels"], pixel_values[:1], atol=1e-6, rtol=0)


def test_layers_after_the_feature_layer_are_dropped(tiny_checkpoint, tmp_path):
    model = GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = GranViTProcessor.from_pretrained(tiny_checkpoint)
    model.config.vision_feature_layer = -2  # LLaVA's choice: the second-to-last layer
    save_granvit(model, processor, tmp_path / "penultimate")
    export_main([str(tmp_path / "penultimate"), str(tmp_path / "vit")])
    encoder = SiglipVisionModel.from_pretrained(tmp_path / "vit").eval()
    assert encoder.config.num_hidden_layers == model.config.vision_config.num_hidden_layers - 1
    pixel_values = processor.image_processor([Image.effect_noise((50, 70), 60).convert("RGB")])["pixel_values"]
    with torch.no_grad():
        hidden = encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(hidden, model.model.get_patch_features(pixel_values).flatten(1, 2))
