"""User text printed through rich keeps its square brackets (rich would read `[arch]` as markup and drop it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.commands._common import user_errors
from pipeline.errors import ConfigError

runner = CliRunner()


def test_error_messages_print_brackets_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as exit_info, user_errors():
        raise ConfigError("r.toml: [arch] with [hparams] activation; see [task] and [bold]x[/bold] and \\[y]")
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip() == (
        "error: r.toml: [arch] with [hparams] activation; see [task] and [bold]x[/bold] and \\[y]")


def test_recipe_error_names_its_tables(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\nmembers = 4\nmembers_per_chunk = 4\nseed = 0\nepochs = 1\n[task]\nname = "digits"\n'
                      '[arch]\nname = "mlp"\nhidden = [8]\nkernel_size = 3\n'
                      '[hparams]\noptimizer = "sgd"\nactivation = "relu"\nbatch_size = 64\nlr = 0.1\n')
    result = runner.invoke(app, ["zoo", str(recipe), "--out", str(tmp_path / "z.zarr"), "--workers", "0"])
    assert result.exit_code == 2, result.output
    assert "[arch] with [hparams]:" in result.output and "kernel_size" in result.output
