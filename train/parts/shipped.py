"""The shipped pretrained parts: `pretrained_parts/` at the repository root, trained once by `granvit-parts`.

    pretrained_parts/
      parts.json      each part's recipe hash, quality figures, wall time and size, and the command that made them
      siglip/         a SiglipModel checkpoint (config, safetensors, tokenizer, image processor, part_report.json)
      lm/             a Qwen2ForCausalLM checkpoint (config, safetensors, tokenizer, part_report.json)

``vision: embedded`` / ``llm: embedded`` in a recipe load these folders; ``granvit-build --vision
pretrained_parts/siglip --llm pretrained_parts/lm`` builds from them like from any Hub id. A part is only used under
the hash of the recipe in `train/configs/parts.yaml`: if the recipe changed since the parts were trained, loading
stops with one line naming the command that retrains them (never a silent retrain).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...console import UserError
from .recipe import PARTS_CONFIG, PartsRecipe, load_parts_recipe, part_hash

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "pretrained_parts"
# Parts from elsewhere (a set retrained with another recipe): the folder and the recipe its parts.json must match.
PARTS_DIR_ENV, PARTS_CONFIG_ENV = "GRANVIT_PARTS_DIR", "GRANVIT_PARTS_CONFIG"
MANIFEST = "parts.json"
PART_NAMES = ("siglip", "lm")
MAX_SHIPPED_BYTES = 64 * 2**20  # what the repository may hold of parts, all together
RETRAIN_COMMAND = "granvit-parts"
CURVES = ("loss_curve", "exact_curve")  # in each part's own part_report.json, not in parts.json


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def read_manifest(root: Path = SHIPPED_DIR) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no pretrained parts there; train them with `{RETRAIN_COMMAND} --out {root}` "
                        f"(recipe {PARTS_CONFIG})")
    return json.loads(path.read_text())


def write_manifest(root: Path, recipe: PartsRecipe, reports: dict, command: str, recipe_path: Path,
                   trained: list[str]) -> dict:
    """parts.json beside the part folders: what each part is, how good, how long it took, and how to remake it.
    `reports` may update a part not `trained` now (the SigLIP's probe, made once the LM part exists): it keeps the
    command that trained it."""
    manifest = read_manifest(root) if (Path(root) / MANIFEST).is_file() else {"parts": {}}
    for name, report in reports.items():
        figures = {k: v for k, v in report.items() if k not in CURVES + ("recipe", "part", "seconds")}
        entry = manifest["parts"].get(name, {}) if name not in trained else {}
        manifest["parts"][name] = {"folder": name, "hash": part_hash(name, recipe), "figures": figures,
                                   "seconds": round(report["seconds"], 1), "bytes": folder_bytes(Path(root) / name),
                                   "command": entry.get("command", command), "recipe": _relative(recipe_path)}
    (Path(root) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _relative(path: Path) -> str:
    """A recipe path as the repository names it (train/configs/parts.yaml), else as given."""
    path, package = Path(path).resolve(), SHIPPED_DIR.parent
    return str(path.relative_to(package)) if path.is_relative_to(package) else str(path)


def shipped_part(name: str, root: Path | None = None, recipe_path: Path | None = None) -> tuple[Path, dict]:
    """(folder, parts.json entry) of a shipped part, after checking that it was trained from today's recipe.
    Defaults: pretrained_parts/ and train/configs/parts.yaml, or $GRANVIT_PARTS_DIR and $GRANVIT_PARTS_CONFIG."""
    import os

    root = Path(root or os.environ.get(PARTS_DIR_ENV) or SHIPPED_DIR)
    recipe_path = Path(recipe_path or os.environ.get(PARTS_CONFIG_ENV) or PARTS_CONFIG)
    entry = read_manifest(root)["parts"].get(name)
    if entry is None:
        raise UserError(f"{Path(root) / MANIFEST} has no {name!r} part; train it with `{RETRAIN_COMMAND} --only {name}`")
    expected = part_hash(name, load_parts_recipe(recipe_path))
    if entry["hash"] != expected:
        raise UserError(f"the shipped {name} part ({Path(root) / entry['folder']}, recipe hash {entry['hash']}) was "
                        f"trained from another recipe than {recipe_path} (hash {expected}): retrain the parts with "
                        f"`{RETRAIN_COMMAND}` (parts.json says how long it took), or restore the recipe")
    return Path(root) / entry["folder"], entry
