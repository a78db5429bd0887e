"""unfzoo pipeline: zoo generation -> zarr store -> weight-space predictors -> scores, and learned optimizers.

Each stage is a module with a Python API; `pipeline.cli` is a thin Typer skin over them.
Importing this package is cheap (no torch): stages import heavy dependencies themselves.
"""

__version__ = "0.1.0"
