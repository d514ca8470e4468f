"""Parts a recipe trains for itself (``vision: pretrain`` / ``llm: pretrain``): trained once, cached by their hash
under ``$GRANVIT_CACHE/parts/<name>-<hash>`` (default ``~/.cache/granvit``), reused by every later run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .cli import train_parts
from .recipe import PartsRecipe, part_hash
from .training import read_report


def cache_root() -> Path:
    return Path(os.environ.get("GRANVIT_CACHE", Path.home() / ".cache" / "granvit"))


def cache_dir(name: str, parts: PartsRecipe) -> Path:
    return cache_root() / "parts" / f"{name}-{part_hash(name, parts)}"


def cached_report(name: str, parts: PartsRecipe) -> dict | None:
    return read_report(cache_dir(name, parts))


def pretrain_cached(names: list[str], parts: PartsRecipe, log=print) -> dict[str, tuple[Path, dict]]:
    """{name: (folder, report)}: from the cache, or trained now (side by side when two are missing)."""
    done = {}
    for name in names:
        report = cached_report(name, parts)
        if report is not None:
            log(f"  {name} part: cached {cache_dir(name, parts)}")
            done[name] = (cache_dir(name, parts), {**report, "hash": part_hash(name, parts), "source": "pretrain"})
    todo = [name for name in names if name not in done]
    if todo:
        # Each part trains in its own hashed folder: train_parts writes <out>/<name>, so give it one folder per part.
        staging = cache_root() / "parts" / f".staging-{os.getpid()}"
        reports = train_parts(parts, todo, staging, staging / "work", log=log)
        for name in todo:
            folder = cache_dir(name, parts)
            folder.parent.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # another process finished it meanwhile: keep theirs
                shutil.rmtree(staging / name)
            else:
                (staging / name).rename(folder)
            done[name] = (folder, {**reports[name], "hash": part_hash(name, parts), "source": "pretrain"})
        shutil.rmtree(staging, ignore_errors=True)
    return {name: done[name] for name in names}
