"""The CLI's skin: help and version work without a traceback; user errors become messages with exit codes."""

from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_help_lists_the_app() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "unfzoo" in result.output.lower() or "Usage" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("unfzoo ")
