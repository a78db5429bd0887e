"""The wheel works outside the checkout: it carries the recipes (resolved by name), the license, and every module the
CLI needs. Built from a copy of the sources and installed into a fresh venv with uv (offline, from uv's cache and the
local wheel folder the Makefile uses), then run from an unrelated folder.

`make test` runs the quick check (build, install, resolve recipes by name); `make wheel-check` sets
UNFZOO_WHEEL_CHECK=1 and also builds a 64-member cnn-digits zoo with the installed `unfzoo` (a few CPU-minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "CITATION.cff", "pipeline", "unf_models")
TORCH_PIN = "torch==2.13.0"


def _run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _find_links() -> list[str]:
    """pip's configured find-links folders (where the local CPU torch wheel lives), as uv arguments."""
    done = _run([sys.executable, "-m", "pip", "config", "get", "global.find-links"], ROOT)
    return [arg for folder in done.stdout.split() for arg in ("--find-links", folder)] if done.returncode == 0 else []


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin folder."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (make setup installs it into .venv)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name)
    (src / "datasets").mkdir()
    for recipe in (ROOT / "datasets").glob("*.toml"):
        shutil.copy2(recipe, src / "datasets" / recipe.name)
    for cache in src.rglob("__pycache__"):
        shutil.rmtree(cache)

    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
                  str(src)], tmp)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("unfzoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"pipeline/zoo/recipes/{p.name}" for p in (ROOT / "datasets").glob("*.toml")} <= set(names)
    assert any(n.endswith("licenses/LICENSE") for n in names)

    venv = tmp / "venv"
    made = _run([uv, "venv", "-q", "--python", sys.executable, str(venv)], tmp)
    assert made.returncode == 0, made.stderr
    install = _run([uv, "pip", "install", "-q", "--offline", "--python", str(venv / "bin" / "python"), *_find_links(),
                    TORCH_PIN, f"{wheel}[parquet]"], tmp)
    if install.returncode != 0 and "offline" in install.stderr.lower():
        pytest.skip(f"uv's cache lacks a dependency and tests never download: {install.stderr.strip()[-300:]}")
    assert install.returncode == 0, install.stderr
    return venv / "bin"


@pytest.mark.slow
def test_wheel_resolves_recipes_by_name_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    code = ("import pipeline, pipeline.zoo.recipe as r; print(pipeline.__file__); print(r.recipes_dir()); "
            "print(r.load_recipe('cnn-digits').members, ' '.join(r.recipe_names()))")
    done = _run([str(installed / "python"), "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr
    module, folder, recipes = done.stdout.splitlines()
    assert str(ROOT) not in module and str(ROOT) not in folder  # the installed copy, not this checkout
    assert recipes.startswith("4096 ") and {"cnn-digits", "gru-arith", "mlp-digits-lopt"} <= set(recipes.split()[1:])

    unknown = _run([str(installed / "unfzoo"), "zoo", "no-such-recipe"], tmp_path)
    assert unknown.returncode == 2 and "cnn-digits" in unknown.stderr + unknown.stdout
    assert "Traceback" not in unknown.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("UNFZOO_WHEEL_CHECK") != "1", reason="a few CPU-minutes: run `make wheel-check`")
def test_wheel_builds_a_zoo_by_recipe_name(installed: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = _run([str(installed / "unfzoo"), "zoo", "cnn-digits", "--members", "64"], tmp_path, timeout=1800, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "64 (64 done" in done.stdout and (tmp_path / "datasets" / "zoos" / "cnn-digits.zarr" / "zarr.json").is_file()
    inspect = _run([str(installed / "unfzoo"), "inspect", "datasets/zoos/cnn-digits.zarr", "--json"], tmp_path, env=env)
    assert inspect.returncode == 0 and '"members": 64' in inspect.stdout
