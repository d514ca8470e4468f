"""Every third-party import in the package is declared in setup.py, in the extra that its part of the package needs.

Static, so one environment checks every extra: each module's `import` / `from` statements (top level and inside
functions) are mapped to distributions with `importlib.metadata.packages_distributions()` and compared with setup.py's
BASE and EXTRAS (read by running setup.py's statements except the `setup()` call).
"""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a user installs to use each part: the base requirements plus these extras.
PART_EXTRAS = {
    ".": [],
    "hub": [],
    "train": ["train"],
    "eval": ["eval"],
    "spaces": ["demo"],
    "experiments": ["train", "eval", "experiments"],
    "bench": ["dev"],
}
FILE_EXTRAS = {
    "eval/lmms_eval_granvit.py": ["eval", "lmms"],
    "eval/lmms_tasks/utils.py": ["eval", "lmms"],
    "train/data/annotate_models.py": ["train", "annotate"],  # the embedded OCR engine
}


def setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    tree.body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call))]
    namespace: dict = {}
    exec(compile(tree, "setup.py", "exec"), namespace)  # BASE, EXTRAS and their arithmetic; no setup() call
    return namespace["BASE"], namespace["EXTRAS"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0])


def modules() -> list[Path]:
    skip = {"tests", ".venv", "build", "outputs", "runs"}
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in skip and p.name != "setup.py")


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in the file, minus the standard library, granvit and sibling files
    (a script's own folder is on sys.path: bench/gpu_bench.py imports region_bench, the Space imports demo_examples)."""
    siblings = {p.stem for p in path.parent.glob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "granvit" and n not in siblings}


def part_extras(path: Path) -> list[str]:
    relative = path.relative_to(ROOT).as_posix()
    if relative in FILE_EXTRAS:
        return FILE_EXTRAS[relative]
    return PART_EXTRAS["." if "/" not in relative else relative.split("/")[0]]


BASE, EXTRAS = setup_requirements()
DISTRIBUTIONS = packages_distributions()  # import name -> distributions (slow: read once)


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_import_is_declared_for_its_part(path):
    allowed = {requirement_name(r) for r in BASE}
    for extra in part_extras(path):
        allowed |= {requirement_name(r) for r in EXTRAS[extra]}
    missing = {}
    for name in sorted(third_party_imports(path)):
        provided_by = {normalize(d) for d in DISTRIBUTIONS.get(name, [])}
        if not provided_by & allowed:
            missing[name] = sorted(provided_by) or "no installed distribution"
    assert not missing, f"{path.relative_to(ROOT)} imports {missing}, not declared in setup.py for {part_extras(path)}"


def test_parts_cover_the_package_and_extras_exist():
    parts = {p.relative_to(ROOT).parts[0] for p in modules() if len(p.relative_to(ROOT).parts) > 1}
    assert parts <= set(PART_EXTRAS), f"new folder(s) {parts - set(PART_EXTRAS)}: say which extras they need"
    used = {e for extras in [*PART_EXTRAS.values(), *FILE_EXTRAS.values()] for e in extras}
    assert used <= set(EXTRAS)
    # the test can fail: an undeclared import is found
    assert third_party_imports(ROOT / "eval" / "probe.py") >= {"sklearn", "threadpoolctl"}
