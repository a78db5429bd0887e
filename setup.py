"""Build hook: ship the recipes (datasets/*.toml, their one source) inside the wheel as pipeline/zoo/recipes/*.toml, so
`unfzoo zoo cnn-digits` resolves by name outside a checkout. Everything else is configured in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "pipeline" / "zoo" / "recipes"
        target.mkdir(parents=True, exist_ok=True)
        for recipe in sorted(Path(__file__).resolve().parent.joinpath("datasets").glob("*.toml")):
            self.copy_file(str(recipe), str(target / recipe.name))


setup(cmdclass={"build_py": BuildPyWithRecipes})
