"""`torch.compile` for the predictors' training steps, with a correction to torch 2.13's CPU code generator.

Inductor's C++ backend chooses where a loop nest's OpenMP parallel region opens by weighing the work of the outer
loops against the first inner one (`LoopNest.max_parallel_depth`). It counts each outer loop's iterations as
size // vector step, so a vectorized loop narrower than one SIMD vector (8 floats against AVX-512's 16) counts as
zero, the whole outer product becomes zero, and the region moves inside the serial outer loops: a reduction over
the middle axis of a `(1440, 8, 8)` tensor forks the thread team 1,440 times per call. The UNF predictor's reads
of members of width 8 are such reductions; with two threads a compiled training step took ~1.6x the eager one
(pytorch/pytorch#190757, fixed upstream by counting such a loop as one iteration). `fix_inductor_parallel_depth`
makes the same correction to the installed torch: where the corrected count keeps the outer loops busy enough, the
region stays outside them; every other decision is inductor's own. With one thread inductor emits no parallel
regions, so nothing changes there.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["RECOMPILE_LIMIT", "compile_step", "fix_inductor_parallel_depth", "recompile_room"]

# inductor's heuristic: parallelize an inner loop only when it has this many times the outer loops' iterations
_INNER_OVER_OUTER = 300
# graphs dynamo may compile for one function (its default: 8). A training run compiles the same forward for every
# model, member width and batch size (the last batch is smaller): `--model unf,unf-perm` on a zoo of three widths
# needs twelve, and past the limit dynamo runs the rest eagerly, with one warning in the log
RECOMPILE_LIMIT = 64


def _ceil_steps(loop: Any) -> int | None:
    """A loop level's iterations, a partial vector counting as one; None for symbolic sizes."""
    size, steps = loop.size, loop.steps
    if not all(isinstance(v, int) or getattr(v, "is_Integer", False) for v in (size, steps)):
        return None
    return -(-int(size) // int(steps))


def fix_inductor_parallel_depth() -> bool:
    """Correct inductor's choice of parallel depth (see the module docstring) for this process; idempotent. Returns
    whether the correction is in place (False where this torch has no such heuristic to correct)."""
    try:
        from torch._inductor.codegen import cpp
    except ImportError:  # a torch without inductor: nothing to correct
        return False
    loop_nest, parallel_depth = getattr(cpp, "LoopNest", None), getattr(cpp, "ParallelDepth", None)
    original = getattr(loop_nest, "max_parallel_depth", None)
    if original is None or parallel_depth is None:
        return False
    if getattr(original, "_unfzoo_fixed", False):
        return True

    def max_parallel_depth(self: Any) -> Any:
        depth = original(self)
        if depth.start_depth == 0 or not self.loops:
            return depth  # parallel from the outermost loop: nothing moved inward
        outer = 1
        for loop in self.loops[:depth.start_depth]:
            steps = _ceil_steps(loop)
            if steps is None:
                return depth
            outer *= steps
        inner = self.loops[depth.start_depth]  # inductor's own (floor) count of it, as in its test
        if _ceil_steps(inner) is None or outer * _INNER_OVER_OUTER < int(inner.size) // int(inner.steps):
            return depth  # the inner loop really dwarfs the outer ones: inductor's choice stands
        # the outer loops (all of one kind: the heuristic moved past exactly those) carry the parallel region
        return parallel_depth(parallel_depth=depth.start_depth, start_depth=0)

    max_parallel_depth._unfzoo_fixed = True  # type: ignore[attr-defined]
    max_parallel_depth.__wrapped__ = original  # type: ignore[attr-defined]
    loop_nest.max_parallel_depth = max_parallel_depth
    return True


@functools.cache
def _fix_marker() -> Any:
    """A no-op post-grad pass whose id enters inductor's cache keys, so graphs compiled without the correction (by an
    earlier run, say) are not served from the on-disk cache to a compile that has it. One instance per process: dynamo
    reuses a compiled graph only for an equal backend, and compiles with equal options are equal."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class ParallelDepthFixed(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            return None

        def uuid(self) -> str:
            return "unfzoo-parallel-depth-" + get_hash_for_files((str(Path(__file__)),)).hex()

    return ParallelDepthFixed()


def compile_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compile(fn, dynamic=False)` (one graph per input shape) with the parallel-depth correction in place."""
    options = {"post_grad_custom_post_pass": _fix_marker()} if fix_inductor_parallel_depth() else None
    # inductor's own deprecation notice (torch 2.13), printed once per compile: nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`torch._prims_common.check` is deprecated", category=FutureWarning)
    return torch.compile(fn, dynamic=False, options=options)


def recompile_room() -> contextlib.AbstractContextManager[Any]:
    """Dynamo's per-function recompile limit at least RECOMPILE_LIMIT for the block (never lowered), then restored."""
    limit = max(int(torch._dynamo.config.recompile_limit), RECOMPILE_LIMIT)
    return torch._dynamo.config.patch(recompile_limit=limit)
