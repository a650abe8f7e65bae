"""The graph as an artefact: what exporting a model with ``jax.export`` costs and buys.

For the MLP (784-512-512-10) and the CNN (conv32-pool-conv64-pool-dense128) on 28x28x1 inputs, 10
classes, from graphduo's own initial parameters (``graphduo.export.export_inference``: logits =
f(images), parameters baked in, a symbolic batch dimension):

* the artefact's size against the parameters' own bytes, and the time to export and serialize it;
* in a fresh process each (the way a server or a batch job meets an artefact), timed apart:
  - ``jit``: graphduo's model built from its code and ``jax.jit(model.apply)``'s first call
    (trace, lower, compile, run) and a warm call: what a process with the code pays;
  - ``load``: ``jax.export.deserialize`` of the file, then its first call (XLA compiles the
    StableHLO for this machine then) and a warm call: what a process with only the artefact pays;
  - ``load, cache``: the same with JAX's persistent compilation cache on, in a second process
    after a first one filled it: the compile stage is then read from disk;
* eager mode has no graph to export: its column reads "no graph";
* where PyTorch is installed, its counterpart on the same weights: ``torch.export.export`` with a
  dynamic batch dimension, ``torch.export.save``, and in a fresh process ``torch.export.load`` and
  the loaded program's first and warm calls (eager-style execution of the exported graph).

Every figure is the median over ``--rounds`` fresh processes; first calls are at batch 32, warm
calls the median of 20. Each child's logits are checked against the in-process model's (the same
function: relative 1e-4, float32 rounding between programs).

Run:
    python experiments/export.py            # both models, 5 rounds
    python experiments/export.py --quick    # smoke test: the MLP, 1 round

Writes ``DIR/results.json`` (every child's times, sizes, the environment), ``DIR/SUMMARY.md`` and
``DIR/first_call.png``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import _common
import _export_child  # experiments/_export_child.py: what each fresh process runs

DEFAULT_OUT = _common.default_out("export")
BATCH = _export_child.BATCH
LOGITS_RTOL = 1e-4
CHILDREN = ("jit", "load", "load-cache")


# ---------------------------------------------------------------------------------------------
# The parent.


def export_model(model_name: str, folder: pathlib.Path) -> dict:
    import jax
    import numpy as np

    from graphduo import export
    from graphduo.models import build_model, count_params

    model = build_model(model_name, _common.INPUT_SHAPE, _common.NUM_CLASSES)
    params = model.init(jax.random.key(0))
    t0 = time.perf_counter()
    exported = export.export_inference(model, params)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = bytes(exported.serialize())
    serialize_s = time.perf_counter() - t0
    path = folder / f"{model_name}.jaxexport"
    path.write_bytes(data)
    reference = np.asarray(jax.jit(model.apply)(params, _export_child.images(model.input_shape, BATCH)))
    row = {"model": model_name, "params": count_params(params),
           "param_bytes": int(sum(p.nbytes for p in jax.tree.leaves(params))),
           "artefact_bytes": len(data), "export_s": export_s, "serialize_s": serialize_s, "path": str(path),
           "reference": reference}
    try:
        import torch
    except ImportError:
        return row
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import _torch_steps

    tmodel = _torch_steps.torch_model(torch, model_name, params).eval()
    x = torch.from_numpy(_export_child.torch_images(model_name, BATCH))
    batch = torch.export.Dim("batch")
    t0 = time.perf_counter()
    program = torch.export.export(tmodel, (x,), dynamic_shapes=({0: batch},))
    torch_export_s = time.perf_counter() - t0
    tpath = folder / f"{model_name}.pt2"
    torch.export.save(program, str(tpath))
    row["torch"] = {"export_s": torch_export_s, "artefact_bytes": tpath.stat().st_size, "path": str(tpath)}
    return row


CHILD = pathlib.Path(__file__).resolve().parent / "_export_child.py"


def run_child(args: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"experiments/export.py: error: a child ({' '.join(args)}) failed: "
                         f"{(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(rows: list[dict], rounds: int, folder: pathlib.Path) -> None:
    import numpy as np

    # Every child inherits the parent's XLA_FLAGS (graphduo's process settings, applied by main), so
    # a compile from code and a compile from the artefact run under the same XLA options.
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    for row in rows:
        row["children"] = {k: [] for k in CHILDREN + (("torch-load",) if "torch" in row else ())}
        for r in range(rounds):
            cache = tempfile.mkdtemp(prefix="cache-", dir=folder)
            run_child(["load", row["path"], cache], env)  # fills the cache
            for kind in CHILDREN:
                result = (run_child(["jit", row["model"]], env) if kind == "jit" else
                          run_child(["load", row["path"], cache if kind == "load-cache" else "-"], env))
                row["children"][kind].append(result)
            if "torch" in row:
                row["children"]["torch-load"].append(run_child(["torch", row["torch"]["path"], row["model"]], env))
            print(f"export: {row['model']} round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        worst = 0.0
        for kind, results in row["children"].items():
            for result in results:
                got = np.asarray(result.pop("logits"))
                worst = max(worst, float(np.max(np.abs(got - row["reference"]) / (1 + np.abs(row["reference"])))))
        row["max_rel_logit_diff"] = worst
        row["same_logits"] = worst <= LOGITS_RTOL
        row.pop("reference")
        row["median"] = {kind: {k: statistics.median(r[k] for r in results) for k in results[0]
                                if isinstance(results[0][k], float)} for kind, results in row["children"].items()}


def summary_lines(payload: dict) -> list[str]:
    lines = ["# export: the graph as an artefact (jax.export), and what it costs", "",
             f"Command: `{payload['command']}`  ", f"Machine: {_common.describe_machine(payload['environment'])}.  ",
             f"Rounds: {payload['rounds']} fresh processes per figure (medians); first calls at batch {BATCH}, warm "
             f"calls the median of {_export_child.WARM_CALLS}.", "",
             "| model | params | parameter bytes | artefact bytes | export + serialize s |",
             "|---|---:|---:|---:|---:|"]
    for row in payload["rows"]:
        lines.append(f"| {row['model']} | {row['params']:,} | {row['param_bytes']:,} | {row['artefact_bytes']:,} "
                     f"({row['artefact_bytes'] / row['param_bytes']:.3f}x) | {row['export_s'] + row['serialize_s']:.3f} |")
    lines += ["", "| model | how the process meets the model | load / build s | first call s | warm call ms | "
                  "warm call ms, `jax.jit(exported.call)` |", "|---|---|---:|---:|---:|---:|"]
    names = {"jit": "the code: build + jax.jit", "load": "the artefact: deserialize + call",
             "load-cache": "the artefact, persistent compilation cache warm", "torch-load": "torch.export.load"}
    for row in payload["rows"]:
        lines.append(f"| {row['model']} | eager mode | no graph | - | - | - |")
        for kind, m in row["median"].items():
            load = m.get("load_s", m.get("build_s", float("nan")))
            jitted = f"{m['warm_jit_call_s'] * 1e3:.3f}" if "warm_jit_call_s" in m else "-"
            lines.append(f"| {row['model']} | {names[kind]} | {load:.3f} | {m['first_call_s']:.3f} | "
                         f"{m['warm_call_s'] * 1e3:.3f} | {jitted} |")
        if "torch" in row:
            t = row["torch"]
            lines.append(f"| {row['model']} | (torch.export: {t['artefact_bytes']:,} bytes, exported in "
                         f"{t['export_s']:.2f} s) | | | | |")
    lines += ["", "Same logits (every child against the in-process model, relative "
                  f"{LOGITS_RTOL:g}): " + ", ".join(f"{r['model']} {'yes' if r['same_logits'] else 'NO'} "
                                                   f"({r['max_rel_logit_diff']:.1e})" for r in payload["rows"]), ""]
    return lines


def write_plot(out: pathlib.Path, rows: list[dict]) -> list[str]:
    plt = _common.pyplot()
    if plt is None:
        return []
    kinds = [k for k in ("jit", "load", "load-cache", "torch-load") if any(k in r["median"] for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax.bar([j + i * width for j in range(len(rows))],
               [r["median"].get(kind, {}).get("first_call_s", float("nan")) for r in rows], width, label=kind)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["model"] for r in rows])
    ax.set_ylabel(f"first call at batch {BATCH}, s (median)")
    ax.set_title("A fresh process's first call: from code, from an artefact")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "first_call.png", dpi=120)
    plt.close(fig)
    return ["first_call.png"]


def build_parser():
    parser = _common.make_parser(__doc__, "Export the MLP and the CNN with jax.export and time what a fresh "
                                          "process pays to run them from code and from the artefact, with "
                                          "torch.export beside them where PyTorch is installed.")
    parser.add_argument("--quick", action="store_true", help="smoke test: the MLP only, one round")
    parser.add_argument("--models", type=_common.models, default=None,
                        help="comma-separated models, of mlp, cnn (default mlp,cnn; --quick: mlp)")
    parser.add_argument("--rounds", type=_common.positive_int, default=None, help="fresh processes per figure "
                                                                                  "(default 5; --quick: 1)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and first_call.png", DEFAULT_OUT))
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.models = args.models or (["mlp"] if args.quick else list(_common.MODELS))
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.out = _common.check_out(parser, args.out)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    settings = _common.setup()
    command = _common.command_line(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphduo-export-") as tmp:
        folder = pathlib.Path(tmp)
        rows = [export_model(m, folder) for m in args.models]
        measure(rows, args.rounds, folder)
    for row in rows:
        row.pop("path")
        row.get("torch", {}).pop("path", None)
    payload = {"command": command, "environment": _common.environment(settings), "rounds": args.rounds,
               "torch": importlib.util.find_spec("torch") is not None and __import__("torch").__version__,
               "rows": rows, "wall_s": time.perf_counter() - t0}
    _common.write_results(args.out, payload)
    lines = summary_lines(payload)
    _common.write_summary(args.out, lines)
    plots = write_plot(args.out, rows)
    print("\n".join(lines))
    print(f"wrote {args.out}/results.json, SUMMARY.md" + "".join(f", {p}" for p in plots), file=sys.stderr)
    if not all(r["same_logits"] for r in rows):
        print("experiments/export.py: error: an artefact's logits differ from the model's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
