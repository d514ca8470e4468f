"""lmms-eval hooks for GranViT's local region tasks; the scoring is granvit.eval.metrics."""
import json

from granvit.eval.metrics import caption_scores, grounding_scores, normalize_text


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def grounding_doc_to_text(doc):
    return doc["caption"]


def grounding_doc_to_target(doc):
    return json.dumps(list(doc["bbox"]))


def _parse_box(text):
    # The GranViT adapter answers "[x1, y1, x2, y2]" or "" (no box): anything else is a counted miss.
    try:
        box = json.loads(text)
    except json.JSONDecodeError:
        return None
    return box if isinstance(box, list) else None


def grounding_process_results(doc, results):
    item = {"pred": _parse_box(results[0]), "box": list(doc["bbox"])}
    return {"acc50": item, "miou": item, "invalid": int(item["pred"] is None)}


def acc50_agg(items):
    return grounding_scores([i["pred"] for i in items], [i["box"] for i in items])["acc@0.5"]


def miou_agg(items):
    return grounding_scores([i["pred"] for i in items], [i["box"] for i in items])["miou"]


def regcap_doc_to_text(doc):
    return json.dumps([float(v) for v in doc["bbox"]])


def regcap_process_results(doc, results):
    return {"cider": {"pred": results[0], "ref": doc["caption"]},
            "exact": float(normalize_text(results[0]) == normalize_text(doc["caption"]))}


def cider_agg(items):
    return caption_scores([i["pred"] for i in items], [i["ref"] for i in items], meteor=False)["cider"]


def count_agg(items):
    return int(sum(items))
