"""``graphduo inspect``: both graphs of a step, measured from JAX's and XLA's own artefacts."""

import json
import os
import sys

import jax
import pytest

from graphduo import build_model, make_optimizer
from graphduo.cli import main
from graphduo.graphs import (example_inputs, hlo_instructions, hlo_to_dot, inspect_eager, inspect_traced,
                             kernel_library, median_op_times)


@pytest.fixture(scope="module")
def mlp_graphs():
    model = build_model("mlp", (8, 8, 1), 10, features=(16,))
    tx = make_optimizer("sgd", 0.1)
    state, batch = example_inputs(model, tx, 8)
    return inspect_traced(model, tx, state, batch), inspect_eager(model, tx, state, batch), (model, tx, state, batch)


def test_eager_replays_exactly_the_ops_of_the_recorded_step(mlp_graphs):
    traced, eager, (model, tx, state, batch) = mlp_graphs
    # Independent count: the jaxpr's top-level equations are the ops eager mode binds one by one.
    from graphduo.step import make_train_step

    jaxpr = jax.make_jaxpr(make_train_step(model.apply, tx))(state, batch)
    assert eager["ops_per_step"] == len(jaxpr.jaxpr.eqns)
    # SGD on a 2-layer MLP: 2 matmuls forward, 3 backward (no input gradient for the first layer).
    assert eager["by_primitive"]["dot_general"]["count"] == 5
    assert [op["phase"] for op in eager["ops"] if op["op"] == "dot_general"] == ["forward"] * 2 + ["backward"] * 3
    # a jitted function is one op, named: graphduo's ReLU, forward and backward
    assert [op["phase"] for op in eager["ops"] if op["name"] == "relu"] == ["forward", "backward"]
    assert {"forward", "backward", "update+metrics"} == set(eager["by_phase"])
    assert all(op["time_us"] > 0 for op in eager["ops"])


def test_traced_counts_fusions_and_shrinks_the_op_count(mlp_graphs):
    traced, eager, _ = mlp_graphs
    assert traced["jaxpr_primitives"]["dot_general"] == 5
    assert 0 < traced["fusions"] <= traced["kernels_per_step"] < eager["ops_per_step"]
    assert traced["cost"]["flops"] > 0 and traced["memory"]["argument_size_in_bytes"] > 0
    ops = [op for _, _, op in hlo_instructions(traced["optimized_hlo"])]
    assert ops.count("fusion") >= traced["fusions"]


# Lines as XLA prints them (jaxlib 0.10, CPU; a GPU custom call), metadata cut.
_YNN = ('  %ynn_fusion.6 = f32[256,512]{1,0} fusion(%bitcast, %k), kind=kCustom, calls=%fused_computation.6, '
        'backend_config={"fusion_config":{"kind":"__ynn_fusion"},"outer_dimension_partitions":[]}')
_LOOP = ('  %select_select_fusion = f32[256,512]{1,0} fusion(%ynn_fusion.5, %b), kind=kLoop, '
         'calls=%fused_computation.38, backend_config={"outer_dimension_partitions":["2"]}')
_DOT = '  %dot.1 = f32[512,512]{1,0} dot(%h, %g), lhs_contracting_dims={0}, rhs_contracting_dims={0}'
_CUBLAS = '  %custom-call.1 = (f32[256,512]{1,0}, s8[4]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"'


@pytest.mark.parametrize("opcode, line, platform, library", [
    ("fusion", _YNN, "cpu", "YNNPACK"),
    ("fusion", _LOOP, "cpu", "XLA codegen"),
    ("dot", _DOT, "cpu", "Eigen"),
    ("dot", _DOT, "gpu", "gpu dot"),
    ("custom-call", _CUBLAS, "gpu", "cuBLAS"),
    ("fusion", '  %f = f32[8,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, backend_config={"operation_queue_id":"0",'
               '"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":{"block_m":"64"}}}',
     "gpu", "Triton"),
    ("custom-call", '  %c = f32[2]{0} custom-call(%a), custom_call_target="my_op"', "cpu", "my_op"),
    ("sort", "  %sort.1 = f32[8]{0} sort(%a), dimensions={0}", "cpu", "XLA codegen"),
])
def test_each_kernel_is_attributed_to_the_library_that_runs_it(opcode, line, platform, library):
    assert kernel_library(opcode, line, platform) == library


def _entry_opcodes(text: str) -> list[tuple[str, str]]:
    """``(opcode, line)`` of the entry computation's instructions, parsed without graphduo's regex:
    skip the (possibly tuple, possibly nested) shape by counting parentheses."""
    lines = text[text.index("\nENTRY") + 1:].splitlines()[1:]
    out = []
    for line in lines[:lines.index("}")]:
        rest = line.split(" = ", 1)[1]
        if rest.startswith("("):
            depth = 0
            for i, ch in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    rest = rest[i + 1:]
                    break
        else:
            rest = rest.split(" ", 1)[1]
        out.append((rest.strip().split("(", 1)[0], line))
    return out


def test_the_step_s_kernels_are_counted_by_library(mlp_graphs):
    traced = mlp_graphs[0]
    by_library = traced["kernels_by_library"]
    not_kernels = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "copy-start", "copy-done"}
    kernels = [(op, line) for op, line in _entry_opcodes(traced["optimized_hlo"]) if op not in not_kernels]
    assert any(" = (" in line for _, line in kernels)  # a multi-output kernel (argmax and max) is counted
    assert traced["kernels_per_step"] == len(kernels) == sum(by_library.values())
    # On XLA:CPU: library fusions say so in their backend config; unfused matmuls run on Eigen. Which
    # dot goes where is the jaxlib's choice and changes between releases: the counts must add up, in
    # whatever split this jaxlib made (the line-level cases above pin each rule).
    ynn = sum('"kind":"__ynn_fusion"' in line for _, line in kernels)
    eigen = sum(op in ("dot", "convolution") for op, _ in kernels)
    assert by_library.get("YNNPACK", 0) == ynn and by_library.get("Eigen", 0) == eigen
    assert ynn + eigen > 0  # the MLP's matmuls are somewhere
    assert by_library["XLA codegen"] == len(kernels) - ynn - eigen


def test_dot_graph_is_well_formed(mlp_graphs):
    traced = mlp_graphs[0]
    dot = hlo_to_dot(traced["optimized_hlo"], traced["platform"])
    assert dot.startswith("digraph step {") and dot.endswith("}")
    assert dot.count("->") > 10 and "fusion" in dot
    for library, count in traced["kernels_by_library"].items():  # every kernel labelled with its library
        assert dot.count(f"\\n{library}\"") == count


def test_inspect_cli_text_json_dot(capsys):
    assert main(["inspect", "--model", "mlp", "--mlp-features", "16"]) == 0
    text = capsys.readouterr().out
    assert "kernels launched / step" in text and "ops dispatched / step" in text and "side by side" in text
    assert "kernels by library       XLA codegen" in text
    assert main(["inspect", "--model", "cnn", "--format", "json", "--dataset", "synthetic", "--synthetic-shape",
                 "28x28x1", "--batch-size", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    # XLA's own convolutions, counted by its cost analysis: the second layer's (462 MFLOP at batch 64)
    # forward and both gradients, the first's weight gradient only (its forward is multiply-adds,
    # its input is data); no custom call anywhere
    assert result["traced"]["jaxpr_primitives"]["conv_general_dilated"] == 4
    assert "ffi_call" not in result["traced"]["jaxpr_primitives"]
    assert result["traced"]["cost"]["flops"] > 3 * 462e6
    assert result["ops_per_kernel"] > 1
    assert main(["inspect", "--format", "dot"]) == 0
    assert capsys.readouterr().out.startswith("digraph")


def test_train_profile_writes_a_perfetto_trace(tmp_path):
    from graphduo import Config, train_and_evaluate

    train_and_evaluate(Config(model="mlp", mlp_features=(16,), steps=5, run_dir=str(tmp_path / "run"),
                              profile=str(tmp_path / "prof")), progress=False)
    traces = list((tmp_path / "prof").rglob("*.trace.json.gz")) + list((tmp_path / "prof").rglob("perfetto_trace*"))
    assert traces, list((tmp_path / "prof").rglob("*"))


def test_eager_op_times_are_medians_over_replays():
    replays = [[{"op": "dot_general", "time_us": t1}, {"op": "add", "time_us": t2}]
               for t1, t2 in ((10.0, 1.0), (500.0, 2.0), (12.0, 3.0))]
    assert [op["time_us"] for op in median_op_times(replays)] == [12.0, 2.0]  # not the first (10), not the mean
    with pytest.raises(ValueError, match="different ops"):
        median_op_times([replays[0], replays[0][:1]])


@pytest.fixture
def fake_dot(tmp_path, monkeypatch):
    """A stand-in for Graphviz's ``dot`` on PATH (CI machines need not have Graphviz): it writes its
    input wrapped in <svg> to -o FILE, or fails like dot on a syntax error when told to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "dot"
    script.write_text(f"""#!{sys.executable}
import os, sys
text = sys.stdin.read()
if os.environ.get("FAKE_DOT_FAILS"):
    sys.exit("Error: <stdin>: syntax error in line 1")
open(sys.argv[sys.argv.index("-o") + 1], "w").write("<svg>" + text + "</svg>")
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    return tmp_path


def test_inspect_svg_renders_all_or_nothing(fake_dot, capsys, monkeypatch):
    out = fake_dot / "graphs" / "step.svg"
    argv = ["inspect", "--model", "mlp", "--mlp-features", "16", "--format", "dot", "--svg", str(out)]
    assert main(argv) == 0
    assert out.read_text().startswith("<svg>digraph step {") and "wrote" in capsys.readouterr().err
    out.unlink()
    monkeypatch.setenv("FAKE_DOT_FAILS", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Graphviz's dot could not render" in err and "syntax error in line 1" in err
    assert list(out.parent.iterdir()) == []  # no SVG, no temporary file


@pytest.mark.parametrize("where,message", [
    ("folder", "is a folder: give a file path"),
    ("under-a-file", "is a file, not a folder"),
    ("no-dot", "--svg needs Graphviz's dot program"),
])
def test_inspect_svg_bad_path_is_refused_before_any_work(fake_dot, capsys, monkeypatch, where, message):
    (fake_dot / "afile").write_text("x")
    svg = {"folder": fake_dot, "under-a-file": fake_dot / "afile" / "g.svg", "no-dot": fake_dot / "g.svg"}[where]
    if where == "no-dot":
        monkeypatch.setenv("PATH", str(fake_dot / "empty"))
    monkeypatch.setattr("graphduo.train.prepare", lambda config: pytest.fail("work began before the check"))
    assert main(["inspect", "--model", "mlp", "--svg", str(svg)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in fake_dot.iterdir()) == ["afile", "bin"]
