"""``graphduo inspect``: both graphs of one training step, side by side.

traced: the static graph XLA compiles: jaxpr equations by primitive, HLO instructions before and
after XLA's optimization passes, the fusions (kernels) it launches per step, FLOPs, bytes,
memory, and the optimized entry computation as Graphviz DOT.

eager: the dynamic graph actually executed in one step: every op dispatched, in order, with its
wall time (each run to completion), grouped by primitive and by phase (forward, backward,
optimizer update).
"""

from __future__ import annotations

import collections
import re
import statistics
import time
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from graphduo.models import Model
from graphduo.step import TrainState, make_scan_steps, make_train_step
from graphduo.traced import TracedStep

# HLO opcodes that move no data and launch nothing: not kernels.
_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "copy-start", "copy-done"}
# name = shape opcode(...); a shape is an array type or a tuple of them, "(f32[8]{0}, s32[8]{0})", which
# may hold comments ("/*index=5*/") and tuples one level down.
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(\((?:[^()]|\([^()]*\))*\)|\S+)\s+([\w\-]+)\(")


def _parse(text: str):
    """``(computation, name, shape, opcode, line)`` for every instruction in HLO text."""
    computation = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and "=" not in stripped.split("(")[0]:
            computation = stripped.split()[1] if stripped.startswith("ENTRY") else stripped.split()[0]
            continue
        match = _INSTRUCTION.match(line)
        if match:
            yield computation, match.group(2), match.group(3), match.group(4), line


def hlo_instructions(text: str) -> list[tuple[str, str, str]]:
    """``(computation, name, opcode)`` of every instruction in HLO text."""
    return [(comp, name, op) for comp, name, _, op, _ in _parse(text)]


# Who runs a kernel, read from the compiled HLO: a fusion XLA hands to a library says so in its
# backend config (CPU: "fusion_config":{"kind":"__ynn_fusion"}; GPU: "fusion_backend_config":
# {"kind":"__cudnn$fusion"}, "__triton_gemm"); a custom call names its target; XLA:CPU
# runs an unfused dot or convolution with Eigen; everything else is code XLA generated itself.
_FUSION_LIBRARIES = {"__ynn": "YNNPACK", "__xnn": "XNNPACK", "__onednn": "oneDNN", "__triton": "Triton",
                     "__cudnn": "cuDNN", "__cublas": "cuBLAS"}
_CUSTOM_CALL_LIBRARIES = {"__cublas": "cuBLAS", "__cudnn": "cuDNN", "__onednn": "oneDNN"}
_FUSION_KIND = re.compile(r'"(?:fusion_config|fusion_backend_config)":\{[^}]*"kind":"([^"]+)"')  # CPU | GPU
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def kernel_library(opcode: str, line: str, platform: str = "cpu") -> str:
    """Which library runs one kernel of a compiled step, from its HLO ``line``: ``YNNPACK``,
    ``Eigen``, ``cuBLAS``, ... or ``XLA codegen`` for the loops XLA emits itself.

    Which library a jaxlib picks for which op changes from release to release; this reads the
    choice off the compiled step rather than assuming it."""
    if opcode == "fusion":
        kind = _FUSION_KIND.search(line)
        if kind:
            return next((lib for prefix, lib in _FUSION_LIBRARIES.items() if kind.group(1).startswith(prefix)),
                        kind.group(1))
        return "XLA codegen"
    if opcode == "custom-call":
        target = _CUSTOM_CALL_TARGET.search(line)
        name = target.group(1) if target else "custom-call"
        return next((lib for prefix, lib in _CUSTOM_CALL_LIBRARIES.items() if name.startswith(prefix)), name)
    if opcode in ("dot", "convolution"):
        return "Eigen" if platform == "cpu" else f"{platform} {opcode}"
    return "XLA codegen"


def _entry_name(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("ENTRY"):
            return line.split()[1]
    return ""


def inspect_traced(model: Model, tx, state: TrainState, batch, *, steps_per_call: int = 1,
                   unroll: int = 1) -> dict[str, Any]:
    """The compiled step's static graph, measured from JAX's and XLA's own artefacts. With
    ``steps_per_call`` > 1, also the executable of that many steps (``scan``): the loop XLA keeps
    and the kernels in its body."""
    step = TracedStep(make_train_step(model, tx))
    stages = step.stages(state, batch)
    primitives = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            primitives[eqn.primitive.name] += 1
            for sub in jex_core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(stages.jaxpr.jaxpr)
    before = stages.lowered.as_text(dialect="hlo")
    after = stages.compiled.as_text()
    entry = _entry_name(after)
    after_instructions = list(_parse(after))
    entry_ops = [(op, line) for comp, _, _, op, line in after_instructions if comp == entry]
    kernels = [(op, line) for op, line in entry_ops if op not in _NOT_KERNELS]
    platform = jax.devices()[0].platform
    libraries = collections.Counter(kernel_library(op, line, platform) for op, line in kernels)
    result = {
        "jaxpr_equations": sum(primitives.values()),
        "jaxpr_primitives": dict(primitives.most_common()),
        "hlo_instructions_before_optimization": len(hlo_instructions(before)),
        "hlo_instructions_after_optimization": len(after_instructions),
        "fusions": sum(op == "fusion" for op, _ in entry_ops),
        "kernels_per_step": len(kernels),
        "kernels_by_opcode": dict(collections.Counter(op for op, _ in kernels).most_common()),
        "kernels_by_library": dict(libraries.most_common()),
        "platform": platform,
        "cost": stages.cost_analysis(),
        "memory": stages.memory_analysis(),
        "compile": {"trace_s": stages.record.trace_s, "lower_s": stages.record.lower_s,
                    "compile_s": stages.record.compile_s},
        "optimized_hlo": after,
    }
    if steps_per_call > 1:
        result["scan"] = inspect_scan(model, tx, state, batch, steps_per_call, unroll=unroll)
    return result


def inspect_scan(model: Model, tx, state: TrainState, batch, steps: int, *, unroll: int = 1) -> dict[str, Any]:
    """The executable of ``steps`` optimizer steps (``graphduo.step.make_scan_steps``): XLA keeps
    the ``lax.scan`` as a ``while`` loop whose body holds ``unroll`` steps' kernels (none when the
    whole call is unrolled)."""
    stacked = jax.tree.map(lambda x: jnp.stack([x] * steps), batch)
    stages = TracedStep(make_scan_steps(make_train_step(model, tx), unroll=unroll)).stages(state, stacked)
    text = stages.compiled.as_text()
    entry = _entry_name(text)
    instructions = list(_parse(text))
    loops = [line for comp, _, _, op, line in instructions if comp == entry and op == "while"]
    bodies = {m.group(1) for line in loops if (m := re.search(r"body=(%?[\w.\-]+)", line))}
    in_body = [op for comp, _, _, op, _ in instructions if comp in bodies and op not in _NOT_KERNELS]
    outside = [op for comp, _, _, op, _ in instructions if comp == entry and op not in _NOT_KERNELS | {"while"}]
    return {"steps_per_call": steps, "unroll": unroll, "while_loops": len(loops), "kernels_in_loop_body": len(in_body),
            "kernels_outside_loop": len(outside), "compile_s": stages.record.total_s,
            "flops_per_call": stages.cost_analysis().get("flops", 0.0)}


_LIBRARY_COLOURS = {"XLA codegen": "#cfe2ff", "YNNPACK": "#d1e7dd", "XNNPACK": "#d1e7dd", "Eigen": "#ffe5d0"}


def hlo_to_dot(text: str, platform: str = "cpu") -> str:
    """The optimized entry computation as a Graphviz DOT graph: kernels as filled boxes labelled
    and coloured by the library that runs them (``kernel_library``), data as edges."""
    entry = _entry_name(text)
    instructions = [i for i in _parse(text) if i[0] == entry]
    names = {name for _, name, _, _, _ in instructions}
    lines = ["digraph step {", "  rankdir=TB; node [shape=box, fontsize=10];"]
    for _, name, shape, opcode, line in instructions:
        label, style = f"{opcode}\\n{shape[:40]}", ""
        if opcode not in _NOT_KERNELS:
            library = kernel_library(opcode, line, platform)
            label += f"\\n{library}"
            style = f', style=filled, fillcolor="{_LIBRARY_COLOURS.get(library, "#f8d7da")}"'
        lines.append(f'  "{name}" [label="{label}"{style}];')
        operands = line[line.index(opcode + "(") + len(opcode) + 1:]
        for operand in re.findall(r"%?([\w.\-]+)", operands.split(")")[0]):
            if operand in names and operand != name:
                lines.append(f'  "{operand}" -> "{name}";')
    lines.append("}")
    return "\n".join(lines)


def inspect_eager(model: Model, tx, state: TrainState, batch, repeats: int = 5) -> dict[str, Any]:
    """Every op one eager step dispatches, in order, each timed to completion.

    The step's graph is recorded as a jaxpr (``jax.make_jaxpr``: exactly the primitives that eager
    mode binds one by one: the forward pass under autodiff's JVP, the transposed backward pass, then
    the optimizer update and metrics) and replayed equation by equation on concrete arrays,
    blocking after each, so each op's time is its own. A first, untimed replay lets JAX compile
    each primitive once, as eager mode does on its first step; then ``repeats`` timed replays, and
    each op's time is its median over them (one replay on a shared machine is one sample).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    step = make_train_step(model, tx)
    closed = jax.make_jaxpr(step)(state, batch)
    inputs = jax.tree.leaves((state, batch))
    _replay(closed, inputs)
    ops = median_op_times([_replay(closed, inputs) for _ in range(repeats)])
    # Where the time of the real eager step goes: the same ops replayed back to back (JAX's dispatch
    # and the ops' own work), and everything else the step does around them in Python (the model's
    # framework: Flax's module machinery; optax's tree walks; autodiff's bookkeeping).
    replay_ms = statistics.median(_replay_whole(closed, inputs) for _ in range(repeats)) * 1e3
    step_ms = statistics.median(_eager_step_s(step, state, batch) for _ in range(repeats)) * 1e3
    by_op: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"count": 0, "time_us": 0.0})
    by_phase: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"count": 0, "time_us": 0.0})
    for op in ops:
        for table, key in ((by_op, op["op"]), (by_phase, op["phase"])):
            table[key]["count"] += 1
            table[key]["time_us"] += op["time_us"]
    return {
        "ops_per_step": len(ops),
        "repeats": repeats,
        "eager_step_ms": step_ms,
        "dispatch_ms": replay_ms,
        "framework_ms": step_ms - replay_ms,
        "total_us": float(sum(op["time_us"] for op in ops)),
        "by_primitive": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["time_us"])),
        "by_phase": dict(by_phase),
        "ops": ops,
    }


def median_op_times(replays: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The ops of several replays of one graph (same ops, same order), each timed by its median."""
    first = replays[0]
    if any(len(r) != len(first) or any(a["op"] != b["op"] for a, b in zip(r, first)) for r in replays):
        raise ValueError("the replays dispatched different ops")
    return [{**op, "time_us": statistics.median(r[i]["time_us"] for r in replays)} for i, op in enumerate(first)]


def _phase(eqn) -> str:
    stack = str(eqn.source_info.name_stack)
    if "transpose(" in stack:
        return "backward"
    if "jvp(" in stack:
        return "forward"
    return "update+metrics"


def run_equation(eqn, args):
    """Run one jaxpr equation eagerly, as ``jax.core.eval_jaxpr`` does: custom-derivative calls
    (graphduo's pooling, any ``custom_jvp``/``custom_vjp``) get their function arguments back
    before binding."""
    with eqn.ctx.manager:
        return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))


def _replay_whole(closed, inputs) -> float:
    """Seconds to replay the step's equations op by op, blocking once at the end (as eager mode does)."""
    t0 = time.perf_counter()
    out = _eval(closed, inputs)
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def _eval(closed, inputs):
    env: dict[Any, Any] = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, inputs))
    for eqn in closed.jaxpr.eqns:
        args = [v.val if isinstance(v, jex_core.Literal) else env[v] for v in eqn.invars]
        out = run_equation(eqn, args)
        env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]))
    return [env[v] for v in closed.jaxpr.outvars if not isinstance(v, jex_core.Literal)]


def _eager_step_s(step, state, batch) -> float:
    """Seconds of one real eager step (the step function called as it is), run to completion."""
    t0 = time.perf_counter()
    jax.block_until_ready(step(state, batch))
    return time.perf_counter() - t0


def _replay(closed, inputs) -> list[dict[str, Any]]:
    env: dict[Any, Any] = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, inputs))

    def read(var):
        return var.val if isinstance(var, jex_core.Literal) else env[var]

    ops = []
    for eqn in closed.jaxpr.eqns:
        args = [read(v) for v in eqn.invars]
        t0 = time.perf_counter()
        out = run_equation(eqn, args)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - t0
        env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]))
        ops.append({"op": eqn.primitive.name, "name": eqn.params.get("name"),  # a jitted function's name
                    "phase": _phase(eqn), "time_us": elapsed * 1e6,
                    "inputs": [list(getattr(a, "shape", ())) for a in args]})
    return ops


def format_report(model_name: str, batch_size: int, traced: dict, eager: dict, top: int = 12) -> str:
    """A text report of both graphs for people."""
    cost, mem = traced["cost"], traced["memory"]
    lines = [
        f"{model_name}, batch {batch_size}: one training step, both graphs",
        "",
        "traced (static graph, compiled once by XLA)",
        f"  jaxpr equations          {traced['jaxpr_equations']}",
        f"  HLO instructions         {traced['hlo_instructions_before_optimization']} before XLA's passes, "
        f"{traced['hlo_instructions_after_optimization']} after",
        f"  kernels launched / step  {traced['kernels_per_step']} ({traced['fusions']} fusions)",
        "  kernels by library       " + ", ".join(f"{lib} {n}" for lib, n in traced["kernels_by_library"].items()),
        f"  FLOPs / step             {cost.get('flops', 0):,.0f}",
        f"  bytes accessed / step    {cost.get('bytes accessed', 0):,.0f}",
        f"  memory                   arguments {mem.get('argument_size_in_bytes', 0):,} B, temporaries "
        f"{mem.get('temp_size_in_bytes', 0):,} B, outputs {mem.get('output_size_in_bytes', 0):,} B",
        f"  trace / lower / compile  {traced['compile']['trace_s']:.3f} / {traced['compile']['lower_s']:.3f} / "
        f"{traced['compile']['compile_s']:.3f} s",
        *_scan_lines(traced.get("scan")),
        "",
        f"eager (dynamic graph, op by op, each op timed to completion; median of {eager.get('repeats', 1)} replays)",
        f"  ops dispatched / step    {eager['ops_per_step']}, {eager['total_us'] / 1e3:.2f} ms in all",
        f"  the whole eager step     {eager['eager_step_ms']:.2f} ms: the ops replayed back to back (JAX's dispatch and "
        f"the ops' work) {eager['dispatch_ms']:.2f} ms, Python and framework work around them "
        f"{eager['framework_ms']:.2f} ms",
    ]
    for phase, row in eager["by_phase"].items():
        lines.append(f"  {phase:<24} {row['count']:>5} ops  {row['time_us'] / 1e3:8.2f} ms")
    lines += ["", f"  {'primitive':<22} {'ops':>5} {'ms':>9} {'us/op':>8}"]
    for name, row in list(eager["by_primitive"].items())[:top]:
        lines.append(f"  {name:<22} {row['count']:>5} {row['time_us'] / 1e3:9.3f} {row['time_us'] / row['count']:8.1f}")
    lines += ["", f"side by side: {eager['ops_per_step']} ops dispatched per eager step against "
                  f"{traced['kernels_per_step']} kernels launched per traced step "
                  f"({eager['ops_per_step'] / max(traced['kernels_per_step'], 1):.1f}x)"]
    return "\n".join(lines)


def _scan_lines(scan: dict | None) -> list[str]:
    if not scan:
        return []
    return [f"  {scan['steps_per_call']} steps per call      {scan['while_loops']} while loop (the lax.scan, "
            f"{scan['unroll']} step(s) an iteration) of {scan['kernels_in_loop_body']} kernels, "
            f"{scan['kernels_outside_loop']} kernels outside it; compiled in {scan['compile_s']:.3f} s"]


def summary(traced: dict, eager: dict) -> dict[str, Any]:
    """The JSON form: everything but the raw HLO text and the per-op list's bulk."""
    t = {k: v for k, v in traced.items() if k != "optimized_hlo"}
    return {"traced": t, "eager": eager,
            "ops_per_kernel": eager["ops_per_step"] / max(traced["kernels_per_step"], 1)}


def example_inputs(model: Model, tx, batch_size: int, seed: int = 0):
    """A fresh train state and one random batch of ``batch_size`` for ``model``."""
    from graphduo.step import create_train_state

    state = create_train_state(model, tx, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    batch = {"image": rng.normal(size=(batch_size, *model.input_shape)).astype(np.float32),
             "label": rng.integers(0, 10, batch_size).astype(np.int32)}
    return state, jax.device_put(batch)
