"""The README's quickstart runs as written (on a tiny zoo, one training epoch), and the docs link only to files that
exist, so neither can rot silently."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

# Shrink the quickstart to seconds: each (README text -> test text) must occur in its block exactly once, so a README
# edit that drops or changes one of these commands fails here and gets this table updated with it.
SHRINK = {
    "bash-1": [
        ("unfzoo zoo cnn-digits --members 256 --out runs/quick/zoo.zarr",
         "unfzoo zoo {tiny} --members 32 --out runs/quick/zoo.zarr --workers 0"),
        ("unfzoo train runs/quick/zoo.zarr --model unf,statnn --out runs/quick/train",
         "unfzoo train runs/quick/zoo.zarr --model unf,statnn --out runs/quick/train --epochs 1"),
    ],
    "python": [
        ('TrainConfig(models=("unf", "statnn"))', 'TrainConfig(models=("unf", "statnn"), epochs=1)'),
    ],
    "bash-2": [
        ("--checkpoint 12", "--checkpoint 2"),
    ],
}


def quickstart_blocks(text: str) -> dict[str, str]:
    """{name: code} of every fenced block preceded by a `<!-- quickstart:NAME -->` marker."""
    pattern = re.compile(r"<!-- quickstart:(\S+) -->\s*```(?:bash|python)\n(.*?)```", re.S)
    return {name: code for name, code in pattern.findall(text)}


def _shrink(name: str, code: str, tiny: Path) -> str:
    for old, new in SHRINK.get(name, []):
        assert code.count(old) == 1, f"README quickstart block {name!r} no longer contains {old!r}; update SHRINK"
        code = code.replace(old, new.format(tiny=tiny))
    return code


def _tiny_recipe(folder: Path) -> Path:
    """cnn-digits with runs of 1 or 2 epochs: the same commands, seconds instead of minutes."""
    text = (ROOT / "datasets" / "cnn-digits.toml").read_text()
    for old, new in (("epochs = 12\n", "epochs = 2\n"),
                     ("checkpoint_epochs = [0, 1, 4, 8, 12]", "checkpoint_epochs = [0, 1, 2]"),
                     ("epochs = { choice = [4, 8, 12] }", "epochs = { choice = [1, 2] }")):
        assert old in text, old
        text = text.replace(old, new)
    path = folder / "tiny-cnn-digits.toml"
    path.write_text(text)
    return path


def test_quickstart_blocks_are_marked() -> None:
    blocks = quickstart_blocks(README.read_text())
    assert list(blocks) == ["bash-1", "python", "bash-2"]


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path: Path) -> None:
    blocks = quickstart_blocks(README.read_text())
    tiny = _tiny_recipe(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    for name, code in blocks.items():
        code = _shrink(name, code, tiny)
        cmd = ["bash", "-euo", "pipefail", "-c", code] if name.startswith("bash") else [sys.executable, "-c", code]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"quickstart block {name!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    quick = tmp_path / "runs" / "quick"
    assert (quick / "train" / "unf").is_dir() and (quick / "train-py" / "statnn").is_dir()
    scores = (quick / "scores.csv").read_text().splitlines()
    assert scores[0].startswith("path,") and len(scores) == 1 + len(list((quick / "checkpoints").glob("*.pt")))
    assert all(",ok," in row for row in scores[1:])


def test_docs_links_resolve() -> None:
    """Every relative link in README.md and docs/*.md points to a file of the project."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 9
    for page in pages:
        text = page.read_text()
        assert "GUIDE" not in text, f"{page.name} refers to a guide file outside the project"
        for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([^)]*))?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
            if anchor:
                assert anchor in _anchors(page.parent / target), f"{page.name} links to missing {target}#{anchor}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
