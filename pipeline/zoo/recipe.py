"""Zoo recipes: a frozen `Recipe` read from TOML, validated field by field, and deterministic hyperparameter draws.

A recipe names a task, an architecture, hyperparameter distributions, the member count and how members are grouped
into chunks. Draws never depend on how many members are built: categorical hyperparameters (one combination per
training chunk, balanced over blocks of chunks) come from (seed, chunk index), continuous ones from (seed,
configuration index), so extending a zoo with `--members` leaves every earlier member unchanged.
"""

from __future__ import annotations

import itertools
import json
import math
import tomllib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import RecipeError

__all__ = [
    "Distribution",
    "Recipe",
    "ChunkDraw",
    "load_recipe",
    "parse_recipe",
    "find_recipe",
    "recipe_names",
    "recipes_dir",
    "chunk_bounds",
    "n_chunks",
    "draw_chunk",
    "draw_hparams",
]

_DIST_KINDS = ("log_uniform", "uniform", "choice")
_TOP_LEVEL = (
    "name",
    "description",
    "members",
    "members_per_chunk",
    "runs_per_config",
    "seed",
    "epochs",
    "checkpoint_epochs",
    "task",
    "arch",
    "hparams",
)
_REQUIRED = ("members", "epochs", "task", "arch", "hparams")
MAX_MEMBERS = 100_000_000  # as pipeline.zoo.store.MAX_MEMBERS: the coordinator holds a few bytes per member in memory
# Salts that keep the per-chunk, per-configuration and per-split random streams apart.
_SALT_CATEGORICAL = 0xC47
_SALT_CONTINUOUS = 0xC0F


def _hparam_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(categorical, continuous) hyperparameter names understood by the training engine."""
    from pipeline.zoo.population import CATEGORICAL_HPARAMS, CONTINUOUS_HPARAMS

    return tuple(CATEGORICAL_HPARAMS), tuple(CONTINUOUS_HPARAMS)


@dataclass(frozen=True)
class Distribution:
    """One hyperparameter's distribution: `constant` (values = (v,)), `choice`, `uniform` or `log_uniform` (lo, hi),
    or `by` (conditional): values = (categorical name, ((value as str, Distribution), ...)), one branch per value of
    that per-chunk hyperparameter, e.g. an lr range per optimizer."""

    kind: str
    values: tuple[Any, ...]

    def to_json(self) -> Any:
        """The TOML/JSON form: a bare constant or a one-key table such as {"log_uniform": [lo, hi]}; a conditional
        is {"by": name, value: branch, ...}."""
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "by":
            return {"by": self.values[0], **{k: d.to_json() for k, d in self.values[1]}}
        return {self.kind: list(self.values)}

    @property
    def branches(self) -> dict[str, Distribution]:
        """A conditional's branches by value (as str); {} for other kinds."""
        return dict(self.values[1]) if self.kind == "by" else {}

    def given(self, categorical: Mapping[str, Any]) -> Distribution:
        """The distribution that applies in a chunk with these categorical values (itself unless conditional)."""
        return self.branches[str(categorical[self.values[0]])] if self.kind == "by" else self

    def sample(self, rng: np.random.Generator) -> Any:
        """Draw one value."""
        if self.kind == "by":
            raise ValueError("a conditional distribution is sampled through .given(categorical)")
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        lo, hi = self.values
        u = float(rng.random())
        if self.kind == "uniform":
            return lo + (hi - lo) * u
        return float(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u))


@dataclass(frozen=True)
class Recipe:
    """A validated zoo recipe. `text`/`source` keep the original TOML; they do not take part in `identity()`."""

    name: str
    task: str
    task_params: Mapping[str, Any]
    arch: Mapping[str, Any]
    hparams: Mapping[str, Distribution]
    members: int
    members_per_chunk: int
    epochs: int
    checkpoint_epochs: tuple[int, ...]
    seed: int = 0
    runs_per_config: int = 1
    description: str = ""
    text: str = field(default="", compare=False, repr=False)
    source: str = field(default="<string>", compare=False)

    @property
    def categorical(self) -> tuple[str, ...]:
        """Names of hyperparameters drawn once per chunk (in the engine's order)."""
        cat, _ = _hparam_names()
        return tuple(n for n in cat if n in self.hparams)

    @property
    def continuous(self) -> tuple[str, ...]:
        """Names of hyperparameters drawn once per configuration (in the engine's order)."""
        _, cont = _hparam_names()
        return tuple(n for n in cont if n in self.hparams)

    def identity(self) -> dict[str, Any]:
        """Everything that determines member i's weights; two recipes with equal identity may share a store."""
        return {
            "task": self.task,
            "task_params": dict(self.task_params),
            "arch": dict(self.arch),
            "hparams": {k: self.hparams[k].to_json() for k in sorted(self.hparams)},
            "members_per_chunk": self.members_per_chunk,
            "runs_per_config": self.runs_per_config,
            "epochs": self.epochs,
            "checkpoint_epochs": list(self.checkpoint_epochs),
            "seed": self.seed,
        }

    def to_dict(self) -> dict[str, Any]:
        """The recipe in its TOML shape, JSON-able; `parse_recipe` turns it back into an equal Recipe."""
        return {
            "name": self.name,
            "description": self.description,
            "members": self.members,
            "members_per_chunk": self.members_per_chunk,
            "runs_per_config": self.runs_per_config,
            "seed": self.seed,
            "epochs": self.epochs,
            "checkpoint_epochs": list(self.checkpoint_epochs),
            "task": {"name": self.task, **dict(self.task_params)},
            "arch": dict(self.arch),
            "hparams": {k: v.to_json() for k, v in self.hparams.items()},
        }

    def with_members(self, members: int) -> Recipe:
        """This recipe with another member count (the identity is unchanged)."""
        if not 1 <= members <= MAX_MEMBERS:
            raise RecipeError(f"{self.source}: --members must be between 1 and {MAX_MEMBERS}, got {members}")
        return replace(self, members=int(members))


@dataclass(frozen=True)
class ChunkDraw:
    """The hyperparameters of one training chunk: member indices, one categorical value each, per-member arrays."""

    chunk: int
    members: np.ndarray  # (m,) int64 member indices
    categorical: dict[str, Any]
    continuous: dict[str, np.ndarray]  # name -> (m,) float64
    config: np.ndarray  # (m,) int64 configuration index (members sharing it share hyperparameters)


def recipes_dir() -> Path:
    """The folder of shipped recipes: `datasets/` of a checkout (their source), else the copy an installed wheel
    carries as package data (`pipeline/zoo/recipes/`, see setup.py)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "datasets").is_dir():
        return checkout / "datasets"
    from importlib.resources import files

    return Path(str(files("pipeline.zoo") / "recipes"))


def recipe_names() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """Resolve a recipe name (`cnn-digits`) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; shipped recipes: {', '.join(recipe_names())}")
        return path
    for folder in (Path.cwd() / "datasets", recipes_dir()):
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    raise RecipeError(
        f"unknown recipe {str(name_or_path)!r}: give a path to a .toml file or one of: {', '.join(recipe_names())}"
    )


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and validate a recipe by name or path; raises RecipeError naming the file and field."""
    path = find_recipe(name_or_path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        kind = "UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "not UTF-8"
        raise RecipeError(f"{path}: the file is {kind} text (byte {err.start}); save it as UTF-8") from None
    return parse_recipe(text, source=str(path), default_name=path.stem)


def parse_recipe(text: str | Mapping[str, Any], *, source: str = "<string>", default_name: str = "zoo") -> Recipe:
    """Validate TOML text (or an already parsed dict) and build a Recipe."""
    if isinstance(text, str):
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{source}: not valid TOML: {err}") from err
    else:
        raw = dict(text)
        text = json.dumps(raw, sort_keys=True)
    where = source

    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise RecipeError(f"{where}: unknown field {unknown[0]!r}; allowed fields: {', '.join(_TOP_LEVEL)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise RecipeError(f"{where}: missing field {missing[0]!r}; required fields: {', '.join(_REQUIRED)}")

    members = _int_field(raw, "members", where, minimum=1)
    if members > MAX_MEMBERS:
        raise RecipeError(f"{where}: field 'members' ({members}) is above the limit of {MAX_MEMBERS} members")
    mpc = _int_field(raw, "members_per_chunk", where, minimum=1, default=min(64, members))
    runs = _int_field(raw, "runs_per_config", where, minimum=1, default=1)
    if mpc % runs:
        raise RecipeError(
            f"{where}: field 'members_per_chunk' ({mpc}) must be a multiple of 'runs_per_config' ({runs}) "
            "so that every configuration's runs share one chunk"
        )
    seed = _int_field(raw, "seed", where, minimum=0, default=0)
    epochs = _int_field(raw, "epochs", where, minimum=1)
    ckpts = raw.get("checkpoint_epochs", [0, epochs])
    if (
        not isinstance(ckpts, list)
        or not all(isinstance(e, int) and not isinstance(e, bool) for e in ckpts)
        or list(ckpts) != sorted(set(ckpts))
        or not ckpts
        or ckpts[0] != 0
        or ckpts[-1] != epochs
    ):
        raise RecipeError(
            f"{where}: field 'checkpoint_epochs' must be a strictly increasing list of integers that starts at 0 "
            f"and ends at epochs ({epochs}), e.g. [0, 1, 5, {epochs}]; got {ckpts!r}"
        )

    task = raw["task"]
    if not isinstance(task, dict) or not isinstance(task.get("name"), str):
        raise RecipeError(f"{where}: field 'task' must be a table with a string 'name', e.g. [task] name = \"digits\"")
    arch = raw["arch"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise RecipeError(f"{where}: field 'arch' must be a table with a string 'name', e.g. [arch] name = \"mlp\"")
    if "activation" in arch:
        raise RecipeError(f"{where}: field 'arch.activation' belongs in [hparams] (activation = \"relu\" or a choice)")

    hparams = _parse_hparams(raw["hparams"], where)
    _check_options(hparams, epochs, arch, where)
    name = raw.get("name", default_name)
    description = raw.get("description", "")
    if not isinstance(name, str) or not name or not isinstance(description, str):
        raise RecipeError(f"{where}: fields 'name' and 'description' must be strings")
    if any(c in name for c in "/\\:") or name in (".", "..") or not name.isprintable():
        raise RecipeError(f"{where}: field 'name' {name!r} must be a plain file name (no '/', '\\', ':' or "
                          "control characters): it names the default store datasets/zoos/NAME.zarr")
    return Recipe(
        name=name,
        task=task["name"],
        task_params={k: v for k, v in task.items() if k != "name"},
        arch=dict(arch),
        hparams=hparams,
        members=members,
        members_per_chunk=mpc,
        epochs=epochs,
        checkpoint_epochs=tuple(ckpts),
        seed=seed,
        runs_per_config=runs,
        description=description,
        text=text,
        source=source,
    )


def _int_field(raw: Mapping[str, Any], key: str, where: str, *, minimum: int, default: int | None = None) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RecipeError(f"{where}: field {key!r} must be an integer >= {minimum}; got {value!r}")
    return value


def _parse_hparams(table: Any, where: str) -> dict[str, Distribution]:
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: field 'hparams' must be a table of name = value or name = {{choice = [...]}}")
    categorical, continuous = _hparam_names()
    allowed = (*categorical, *continuous)
    out: dict[str, Distribution] = {}
    for name, spec in table.items():
        field_name = f"hparams.{name}"
        if name not in allowed:
            raise RecipeError(f"{where}: unknown field {field_name!r}; allowed hyperparameters: {', '.join(allowed)}")
        dist = _parse_distribution(spec, f"{where}: field {field_name!r}")
        if name in continuous:
            _check_continuous(name, dist, f"{where}: field {field_name!r}")
        else:
            _check_categorical(name, dist, f"{where}: field {field_name!r}")
        out[name] = dist
    missing = [n for n in _required_hparams() if n not in out]
    if missing:
        raise RecipeError(f"{where}: missing field 'hparams.{missing[0]}'; required: {', '.join(_required_hparams())}")
    return out


def _check_options(hparams: Mapping[str, Distribution], epochs: int, arch: Mapping[str, Any], where: str) -> None:
    """Cross-field checks: conditionals name a per-chunk hyperparameter of this recipe and cover each of its values;
    per-member epochs fit in the run; a width choice needs an architecture with widths."""
    from pipeline.zoo.members import WIDTH_FIELDS

    for name, dist in hparams.items():
        if dist.kind != "by":
            continue
        by, field_name = dist.values[0], f"{where}: field 'hparams.{name}'"
        if by not in hparams or by not in _hparam_names()[0]:
            present = [n for n in _hparam_names()[0] if n in hparams]
            raise RecipeError(f"{field_name}: by = {by!r} must name a per-chunk hyperparameter of this recipe: {', '.join(present)}")
        want = [str(v) for v in hparams[by].values]
        have = list(dist.branches)
        missing, extra = [v for v in want if v not in have], [v for v in have if v not in want]
        if missing or extra:
            raise RecipeError(
                f"{field_name}: needs one entry per value of {by!r} ({', '.join(want)}); "
                + (f"missing {missing[0]!r}" if missing else f"{extra[0]!r} is not a value of {by!r}")
            )
    if "epochs" in hparams:
        dist = hparams["epochs"]
        values = [v for d in (dist.branches.values() if dist.kind == "by" else [dist]) for v in d.values]
        if any(v > epochs for v in values):
            raise RecipeError(f"{where}: field 'hparams.epochs': per-member epochs must be <= epochs ({epochs}); got {values!r}")
    if "width" in hparams and arch.get("name") not in WIDTH_FIELDS:
        raise RecipeError(
            f"{where}: field 'hparams.width' applies to arch {' or '.join(map(repr, WIDTH_FIELDS))}, not {arch.get('name')!r}"
        )


def _required_hparams() -> tuple[str, ...]:
    from pipeline.zoo.population import REQUIRED_HPARAMS

    return tuple(REQUIRED_HPARAMS)


def _parse_distribution(spec: Any, where: str, *, conditional: bool = True) -> Distribution:
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise RecipeError(f"{where}: a list is ambiguous; write {{choice = {spec!r}}}")
        return Distribution("constant", (spec,))
    if "by" in spec:
        by = spec["by"]
        if not conditional or not isinstance(by, str) or len(spec) < 2:
            raise RecipeError(
                f"{where}: a conditional is a table with by = \"<per-chunk hyperparameter>\" and one distribution per "
                f"value, e.g. {{by = \"optimizer\", sgd = {{log_uniform = [0.01, 0.3]}}, adam = ...}} (not nested); got {spec!r}"
            )
        branches = tuple((str(k), _parse_distribution(v, f"{where} [{k}]", conditional=False)) for k, v in spec.items() if k != "by")
        return Distribution("by", (by, branches))
    if len(spec) != 1 or next(iter(spec)) not in _DIST_KINDS:
        raise RecipeError(
            f"{where}: must be a constant or a one-key table with one of {', '.join(_DIST_KINDS)}, "
            f"e.g. {{log_uniform = [1e-4, 1e-2]}}; got {spec!r}"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise RecipeError(f"{where}: {kind} needs a non-empty list; got {values!r}")
    if kind == "choice":
        return Distribution("choice", tuple(values))
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise RecipeError(f"{where}: {kind} needs [low, high] numbers; got {values!r}")
    lo, hi = float(values[0]), float(values[1])
    if not lo <= hi:
        raise RecipeError(f"{where}: {kind} needs low <= high; got [{lo}, {hi}]")
    if kind == "log_uniform" and lo <= 0:
        raise RecipeError(f"{where}: log_uniform needs 0 < low <= high; got [{lo}, {hi}]")
    return Distribution(kind, (lo, hi))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_continuous(name: str, dist: Distribution, where: str) -> None:
    if dist.kind == "by":
        for key, branch in dist.branches.items():
            _check_continuous(name, branch, f"{where} [{key}]")
        return
    values = dist.values
    if not all(_is_number(v) for v in values):
        raise RecipeError(f"{where}: values must be finite numbers; got {list(values)!r}")
    from pipeline.zoo.population import _RANGES  # the engine's domains, so recipe and engine never disagree

    lo, hi, lo_in, hi_in = _RANGES.get(name, (-math.inf, math.inf, False, False))
    for v in values:
        if not ((v > lo or (lo_in and v == lo)) and (v < hi or (hi_in and v == hi))):
            interval = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
            raise RecipeError(f"{where}: value {v!r} is outside the allowed range {interval}")
    from pipeline.zoo.population import _INTEGER_HPARAMS

    if name in _INTEGER_HPARAMS and (dist.kind in ("uniform", "log_uniform") or any(v != int(v) for v in values)):
        raise RecipeError(f"{where}: {name} takes whole numbers; use a constant or a choice of integers, got {dist.to_json()!r}")


def _check_categorical(name: str, dist: Distribution, where: str) -> None:
    if dist.kind in ("uniform", "log_uniform", "by"):
        raise RecipeError(f"{where}: {name} is drawn once per chunk from a finite set; use a constant or choice")
    allowed = _categorical_values(name)
    for v in dist.values:
        if name in ("batch_size", "width"):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RecipeError(f"{where}: {name.replace('_', ' ')}s must be positive integers; got {v!r}")
        elif allowed is not None and v not in allowed:
            raise RecipeError(f"{where}: {v!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")


def _categorical_values(name: str) -> tuple[Any, ...] | None:
    """The values the engine accepts for a categorical hyperparameter (None for batch_size, width: positive ints)."""
    if name == "optimizer":
        from pipeline.zoo.population import OPTIMIZERS

        return tuple(OPTIMIZERS)
    if name == "activation":
        from pipeline.zoo.members import ACTIVATIONS

        return tuple(ACTIVATIONS)
    if name == "init":
        from pipeline.zoo.population import INIT_SCHEMES

        return tuple(INIT_SCHEMES)
    if name == "schedule":
        from pipeline.zoo.population import SCHEDULES

        return tuple(SCHEDULES)
    return None


def n_chunks(members: int, members_per_chunk: int) -> int:
    """Number of chunks covering `members` members."""
    return -(-members // members_per_chunk)


def chunk_bounds(chunk: int, members: int, members_per_chunk: int) -> tuple[int, int]:
    """[start, stop) member indices of chunk `chunk`."""
    start = chunk * members_per_chunk
    return start, min(start + members_per_chunk, members)


def _stream(seed: int, salt: int, index: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, salt, index, zlib.crc32(name.encode())]))


def _chunk_categoricals(recipe: Recipe, chunk: int) -> dict[str, Any]:
    """Balanced per-chunk draw: every block of K consecutive chunks (K = number of combinations of the categorical
    values) holds each combination once, in an order drawn from (seed, block). Depends on (seed, chunk) only."""
    names = recipe.categorical
    combos = list(itertools.product(*(recipe.hparams[n].values for n in names)))
    block, pos = divmod(chunk, len(combos))
    order = _stream(recipe.seed, _SALT_CATEGORICAL, block, "|".join(names)).permutation(len(combos))
    return dict(zip(names, combos[int(order[pos])]))


def draw_chunk(recipe: Recipe, chunk: int, members: int | None = None) -> ChunkDraw:
    """Hyperparameters of chunk `chunk` of a zoo of `members` members (default: recipe.members)."""
    total = recipe.members if members is None else members
    start, stop = chunk_bounds(chunk, total, recipe.members_per_chunk)
    if start >= stop:
        raise ValueError(f"chunk {chunk} is empty for {total} members of {recipe.members_per_chunk} per chunk")
    idx = np.arange(start, stop, dtype=np.int64)
    config = idx // recipe.runs_per_config
    categorical = _chunk_categoricals(recipe, chunk)
    continuous: dict[str, np.ndarray] = {}
    for n in recipe.continuous:
        dist = recipe.hparams[n].given(categorical)
        values = {int(c): float(dist.sample(_stream(recipe.seed, _SALT_CONTINUOUS, int(c), n))) for c in np.unique(config)}
        continuous[n] = np.array([values[int(c)] for c in config], dtype=np.float64)  # (m,)
    return ChunkDraw(chunk=chunk, members=idx, categorical=categorical, continuous=continuous, config=config)


def draw_hparams(recipe: Recipe, members: int | None = None) -> dict[str, np.ndarray]:
    """Every member's hyperparameters as {name: (members,) array} (categoricals as object arrays)."""
    total = recipe.members if members is None else members
    cols: dict[str, list[np.ndarray]] = {n: [] for n in (*recipe.categorical, *recipe.continuous)}
    for c in range(n_chunks(total, recipe.members_per_chunk)):
        draw = draw_chunk(recipe, c, total)
        for n, v in draw.categorical.items():
            cols[n].append(np.full(len(draw.members), v, dtype=object))
        for n, v in draw.continuous.items():
            cols[n].append(v)
    return {n: np.concatenate(v) for n, v in cols.items()}
