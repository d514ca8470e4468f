"""A checkpoint folder loads with trust_remote_code in a fresh process where this repository is NOT importable."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from granvit import GranViTForConditionalGeneration, GranViTModel, GranViTProcessor
from conftest import every_box_format

tiny_checkpoint, tiny_model_and_processor = every_box_format()  # every test here, once per box format

FRESH_PROCESS = textwrap.dedent(
    """
    import importlib, json, sys
    sys.modules["granvit"] = None  # the package may be installed here: make sure only the checkpoint's code is used
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    if sys.argv[3] == "no-dynamic-layer":  # a transformers release that no longer provides the cache layer class
        sys.modules["transformers"].DynamicLayer = None  # (what the checkpoint's own `import transformers` will get)

    ckpt, inputs_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[4]))  # the parent's: bitwise equality needs the same reduction order
    ref = torch.load(inputs_path)
    report = {}
    config = AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
    report["config"] = type(config).__name__
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    report["processor"] = type(processor).__name__
    batch = processor(images=[Image.new("RGB", (50, 30), "red")], text=[processor.vqa_prompt("what?")])
    report["same_inputs"] = torch.equal(batch["input_ids"], ref["input_ids"])
    model = AutoModelForImageTextToText.from_pretrained(ckpt, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
    report["model"], report["base"] = type(model).__name__, type(base).__name__
    report["module"] = type(model).__module__
    with torch.no_grad():
        report["logits_equal"] = torch.equal(model(**batch).logits, ref["logits"])
        report["hidden_equal"] = torch.equal(base(**batch).last_hidden_state, ref["hidden"])
    generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    report["generate_equal"] = torch.equal(generated, ref["generated"])
    boxes = model.ground(processor, Image.new("RGB", (50, 30), "red"), ["red", "a longer phrase"])
    report["ground_boxes"] = [len(b) for b in boxes]
    decoding = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".region_decoding_granvit")
    report["preallocated_cache"] = decoding.preallocated_cache_works()
    regions = pipeline("granvit-regions", model=ckpt, trust_remote_code=True)
    report["regions_pipeline"] = type(regions).__name__
    report["regions"] = regions(Image.new("RGB", (50, 30), "red"), **ref["regions_query"])
    pipe = pipeline("image-text-to-text", model=ckpt, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (50, 30), "red")},
                                             {"type": "text", "text": "what?"}]}]
    out = pipe(text=messages, max_new_tokens=3)
    report["pipeline_roles"] = [m["role"] for m in out[0]["generated_text"]]
    print("REPORT " + json.dumps(report))
    """
)


@pytest.mark.parametrize("transformers_cache", ["as installed", "no-dynamic-layer"])
def test_fresh_process_remote_code_load(tmp_path, tiny_checkpoint, transformers_cache):
    """Everything a user does with a checkpoint, from its own code only; with "no-dynamic-layer" on a transformers
    without the cache class the dense decoding's fast path builds on (it must fall back and give the same answers)."""
    model = GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    base = GranViTModel.from_pretrained(tiny_checkpoint).eval()
    processor = GranViTProcessor.from_pretrained(tiny_checkpoint)
    batch = processor(images=[Image.new("RGB", (50, 30), "red")], text=[processor.vqa_prompt("what?")])
    with torch.no_grad():
        reference = {
            "input_ids": batch["input_ids"],
            "logits": model(**batch).logits,
            "hidden": base(**batch).last_hidden_state,
            "generated": model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False),
        }
    query = {"boxes": [[0, 0, 50, 30], [5, 5, 20, 25]], "phrases": ["red", "a longer phrase"]}
    reference["regions_query"] = query
    image = Image.new("RGB", (50, 30), "red")
    expected_regions = [{"box": [float(v) for v in b], "caption": c}
                        for b, c in zip(query["boxes"], model.describe_regions(processor, image, query["boxes"]))]
    expected_regions += [{"phrase": p, **g} for p, g in
                         zip(query["phrases"], model.ground(processor, image, query["phrases"], return_scores=True))]
    torch.save(reference, tmp_path / "reference.pt")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(tiny_checkpoint), str(tmp_path / "reference.pt"), transformers_cache,
         str(torch.get_num_threads())],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert report["config"] == "GranViTConfig" and report["processor"] == "GranViTProcessor"
    assert report["model"] == "GranViTForConditionalGeneration" and report["base"] == "GranViTModel"
    assert report["module"].startswith("transformers_modules.")
    assert report["same_inputs"] and report["logits_equal"] and report["hidden_equal"] and report["generate_equal"]
    assert report["pipeline_roles"] == ["user", "assistant"]
    assert report["ground_boxes"] == [1, 1]  # the box grammar makes every grounding answer parse
    assert report["preallocated_cache"] is (transformers_cache == "as installed")
    assert report["regions_pipeline"] == "GranViTRegionsPipeline"
    assert report["regions"] == expected_regions  # fast or fallback cache path: the same answers as in this process


def test_native_registration_without_remote_code(tiny_checkpoint):
    """With the package installed (and imported), the Auto classes resolve GranViT natively."""
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    assert type(AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)) is GranViTForConditionalGeneration
    assert type(AutoModel.from_pretrained(tiny_checkpoint)) is GranViTModel
    assert type(AutoProcessor.from_pretrained(tiny_checkpoint)) is GranViTProcessor


def test_build_cli_writes_a_complete_checkpoint(tmp_path):
    from granvit.train.build import main
    from granvit.train.tiny import save_tiny_parts

    vision_dir, llm_dir = save_tiny_parts(tmp_path / "parts", tie_word_embeddings=True)
    main(["--vision", str(vision_dir), "--llm", str(llm_dir), "--out", str(tmp_path / "ckpt"),
          "--num-coord-bins", "50", "--spatial-merge-size", "2"])
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"model.safetensors", "config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "configuration_granvit.py", "modeling_granvit.py", "processing_granvit.py",
            "image_processing_granvit.py", "region_decoding_granvit.py", "box_utils_granvit.py",
            "box_grammar_granvit.py"} <= files
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    assert config["custom_pipelines"]["granvit-regions"]["impl"] == "pipeline_granvit.GranViTRegionsPipeline"
    assert "pipeline_granvit.py" in files
    assert config["tie_word_embeddings"] is True and config["spatial_merge_size"] == 2
    model = GranViTForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # The LLM part is the pretrained LLM: same logits on text-only input for the original vocabulary.
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits[..., : lm.config.vocab_size]
        torch.testing.assert_close(ours, lm(input_ids=ids).logits)
    processor = GranViTProcessor.from_pretrained(tmp_path / "ckpt")
    assert processor.num_image_tokens == 4 and processor.num_coord_bins == 50


def test_build_from_a_dual_encoder_logs_no_warning(tmp_path):
    """A full SigLIP checkpoint (text half + pooling head) builds without a library warning: its vision config is read
    alone (a whole SigLIP config warns about transformers' own default text config, transformers#47612) and the text
    half and head left behind on purpose are not reported; the tower holds the checkpoint's vision weights."""
    import logging

    import transformers
    from granvit.train.build import build_granvit
    from granvit.train.tiny import save_tiny_parts
    from transformers import SiglipConfig, SiglipModel

    _, llm_dir = save_tiny_parts(tmp_path / "parts")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=64,
                 patch_size=16)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                bos_token_id=0, eos_token_id=0, pad_token_id=0)
    full = SiglipModel(SiglipConfig(text_config=text, vision_config=tower))
    full.save_pretrained(tmp_path / "siglip")
    logging.Logger.warning_once.cache_clear()  # transformers warns once per message and process: start afresh
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    transformers.logging.get_logger("transformers").addHandler(handler)
    try:
        model, _ = build_granvit(str(tmp_path / "siglip"), str(llm_dir), num_coord_bins=16)
    finally:
        transformers.logging.get_logger("transformers").removeHandler(handler)
    assert warnings == []
    theirs = full.vision_model.state_dict()  # with the pooling head, which the tower leaves behind
    ours = model.model.vision_tower.state_dict()
    assert ours and all(torch.equal(v, theirs[k.removeprefix("vision_model.")]) for k, v in ours.items())
