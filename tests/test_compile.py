"""pipeline.compile: compiled training steps and the correction of inductor's parallel-depth choice (torch 2.13 opens
OpenMP parallel regions inside serial loops when a vectorized loop is narrower than one SIMD vector)."""

from __future__ import annotations

import pytest
import torch

from pipeline import compile as compile_mod


def _cxx_available() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure means inductor cannot build C++ here
        return False
    return True


def _parallel_region_in_serial_loop(code: str) -> bool:
    """Whether generated C++ opens `#pragma omp parallel` inside a `for` loop that no `omp for` distributes."""
    depth, serial_bodies, pending, previous = 0, [], False, ""
    for raw in code.splitlines():
        line = raw.strip()
        if line.startswith("#pragma omp parallel") and serial_bodies:
            return True
        if line.startswith(("for(", "for (")):
            pending = not previous.startswith(("#pragma omp for", "#pragma omp parallel for"))
        for char in line:
            if char == "{":
                depth += 1
                if pending:
                    serial_bodies.append(depth)
                    pending = False
            elif char == "}":
                if serial_bodies and serial_bodies[-1] == depth:
                    serial_bodies.pop()
                depth -= 1
        if line:
            previous = line
    return False


def test_scanner_sees_nesting() -> None:
    nested = "for(int x0=0; x0<9; x0+=1)\n{\n  #pragma omp parallel\n  {\n  }\n}\n"
    distributed = "#pragma omp parallel\n{\n  #pragma omp for\n  for(int x0=0; x0<9; x0+=1)\n  {\n  }\n}\n"
    after = "for(int x0=0; x0<9; x0+=1)\n{\n}\n#pragma omp parallel\n{\n}\n"
    assert _parallel_region_in_serial_loop(nested)
    assert not _parallel_region_in_serial_loop(distributed)
    assert not _parallel_region_in_serial_loop(after)


def test_fix_is_idempotent() -> None:
    from torch._inductor.codegen import cpp

    assert compile_mod.fix_inductor_parallel_depth()
    first = cpp.LoopNest.max_parallel_depth
    assert compile_mod.fix_inductor_parallel_depth()
    assert cpp.LoopNest.max_parallel_depth is first
    assert not getattr(first.__wrapped__, "_unfzoo_fixed", False)  # wraps inductor's own, not itself


@pytest.mark.skipif(not _cxx_available(), reason="inductor finds no C++ compiler here")
def test_reduction_over_a_narrow_middle_axis_parallelizes_its_outer_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Summing the middle axis of a (96, 8, 8) tensor (8 floats, under one AVX-512 vector): inductor as shipped
    opens the parallel region inside the serial loop over the 96 x 8 outputs (one fork per output row); corrected,
    the outer loop is the parallel one. Same sums either way."""
    from torch._inductor import config as inductor_config
    from torch._inductor.codegen import cpp
    from torch._inductor.utils import run_and_get_code

    compile_mod.fix_inductor_parallel_depth()
    fixed = cpp.LoopNest.max_parallel_depth
    x = torch.randn(96, 8, 8, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # inductor emits no parallel regions for one thread
    try:
        codes = {}
        for name, heuristic in (("shipped", fixed.__wrapped__), ("corrected", fixed)):
            monkeypatch.setattr(cpp.LoopNest, "max_parallel_depth", heuristic)
            torch._dynamo.reset()
            with inductor_config.patch(force_disable_caches=True):
                out, code = run_and_get_code(torch.compile(lambda t: t.sum(1), fullgraph=True), x)
            torch.testing.assert_close(out, x.sum(1))
            codes[name] = "\n".join(code)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert _parallel_region_in_serial_loop(codes["shipped"])  # the bug this corrects (torch 2.13)
    assert not _parallel_region_in_serial_loop(codes["corrected"])


def test_compile_step_marks_its_cache_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile_step compiles one graph per shape, with a no-op pass whose id enters inductor's cache keys: graphs an
    uncorrected compile left in the on-disk cache are not reused."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    fn = compile_mod.compile_step(torch.nn.Identity())
    assert isinstance(fn, torch.nn.Identity) and seen[0]["dynamic"] is False
    compile_mod.compile_step(torch.nn.Identity())
    assert seen[1] == seen[0]  # equal options, so dynamo takes the compiles for one backend (next test)
    marker = seen[0]["options"]["post_grad_custom_post_pass"]
    assert isinstance(marker, CustomGraphPass)
    assert marker.uuid().startswith("unfzoo-parallel-depth-")
    graph = torch.fx.Graph()
    assert marker(graph) is None and len(graph.nodes) == 0  # changes nothing


@pytest.mark.skipif(not _cxx_available(), reason="inductor finds no C++ compiler here")
def test_compile_steps_of_new_models_reuse_the_compiled_graph() -> None:
    """Each model seed compiles its forward anew with compile_step; the graph of the first serves the later ones (no
    recompile for a 'different backend'), so a run of many seeds stays within dynamo's recompile limit instead of
    falling back to eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        x = torch.randn(4, 8)
        for seed in range(3):
            model = torch.nn.Linear(8, 2)
            torch.nn.init.constant_(model.weight, float(seed))
            out = compile_mod.compile_step(model)(x)
            torch.testing.assert_close(out, model(x))
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
