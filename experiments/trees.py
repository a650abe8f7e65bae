"""Before and after: graphduo's steps from two source trees, at two JAX installs, with PyTorch's
fastest variant beside them, interleaved in one run.

What it measures: the Adam training step (lr 1e-3) of the MLP (784-512-512-10) and the CNN
(conv32-pool-conv64-pool-dense128) on 28x28x1 inputs, 10 classes, at batch 32 and 256, in both
paradigms (``EagerStep`` and ``TracedStep`` around ``make_train_step(model.apply, tx)``), for every
pair of a source tree (``--tree NAME=PATH``: a checkout whose ``src/`` holds graphduo) and a Python
(``--python NAME=INTERPRETER``: a virtual environment with JAX, Flax and optax); and PyTorch's
variants of the same step (``experiments/_torch_steps.py``: eager with the default Adam and with
``fused=True``, the whole step under ``torch.compile``) under ``--torch-python``.

How: one long-lived worker process per cell (tree x Python, and one for PyTorch). Each worker
applies its own tree's entry-point process settings (as that tree's CLI does, recorded), builds
every workload from the same seed, runs 5 steps on 5 fixed batches (their losses are compared
across all cells: the same function everywhere) and warms up. Then, in each round, the parent asks
every worker in turn, in an order that flips each round, to time each of its steps: every step run
to completion, the median of ``--steps`` steps (fewer for steps that take long). Only one worker
runs at a time; the others wait on their input. A cell's figure is the median over rounds of its
per-round medians; a ratio is the median over rounds of the per-round ratios.

Run:
    python experiments/trees.py --tree before=../main-before --tree after=. \\
        --python jax-0.10.2=.venv/bin/python --python jax-0.12.0.1=.venv312/bin/python \\
        --torch-python .venv/bin/python
    python experiments/trees.py --quick          # this tree, this Python, PyTorch if installed

Writes ``DIR/results.json`` (every per-round time, the losses, each worker's environment and
settings), ``DIR/SUMMARY.md`` and ``DIR/step_time.png``.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
LR = 1e-3
WORKLOADS = (("mlp", 32), ("mlp", 256), ("cnn", 32), ("cnn", 256))
QUICK_WORKLOADS = (("mlp", 32), ("cnn", 32))
CHECK_STEPS = 5
# Loss agreement after CHECK_STEPS Adam steps from the same weights on the same batches. Trees,
# JAX releases and PyTorch sum in different orders (and pick different kernels), so float32
# results differ by rounding from step 0, and Adam's per-entry normalisation can turn a rounding
# difference of a near-zero gradient entry into a visible one. Over five steps that moves the loss
# by ~1e-5..1e-4; a wrong weight layout or optimizer is off by 1e-1 from the first step.
LOSS_RTOL = 1e-3
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "trees"
HERE = pathlib.Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------
# Workers. They import only what their cell provides: graphduo from the tree on PYTHONPATH (of
# whichever version), or torch; never this tree's experiment helpers.


def _batches(batch_size: int, n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u = rng.random((batch_size, *INPUT_SHAPE), dtype=np.float32)
        out.append({"image": np.where(u < 0.6, 0.0, u).astype(np.float32),  # digit-like zeros
                    "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)})
    return out


def _apply_settings() -> dict:
    """The tree's own entry-point defaults, applied as its CLI applies them, before JAX starts."""
    from graphduo import cli, runtime

    if hasattr(cli, "apply_process_settings"):
        return cli.apply_process_settings().record()
    if hasattr(runtime, "apply_process_settings"):  # the portable core before the entry points owned it
        return runtime.apply_process_settings().record()
    flags, notes = runtime.apply_cpu_settings()  # graphduo before the portable core
    os.environ["XLA_FLAGS"] = flags
    return {"xla_flags": flags, "notes": notes}


def _timed(step, state, batch, steps: int, block):
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        block((state, metrics))
        times.append(time.perf_counter() - t0)
    return state, statistics.median(times) * 1e3


def _steps_for(probe_ms: float, budget_s: float, most: int) -> int:
    return int(min(most, max(3, round(budget_s * 1e3 / max(probe_ms, 1e-3)))))


def _workloads(text: str) -> list[tuple[str, int]]:
    return [(w[:3], int(w[3:])) for w in text.split(",")]


def _workload_arg(workloads) -> str:
    return ",".join(f"{name}{batch}" for name, batch in workloads)


def jax_worker(budget_s: float, most: int, workloads) -> None:
    settings = _apply_settings()
    import jax
    import graphduo
    from graphduo import EagerStep, TracedStep, build_model, create_train_state, make_optimizer, make_train_step

    tx = make_optimizer("adam", LR)
    cells, hello = {}, {"settings": settings, "jax": jax.__version__, "graphduo_file": graphduo.__file__,
                        "losses": {}, "first_step_s": {}}
    for name, batch_size in workloads:
        model = build_model(name, INPUT_SHAPE, NUM_CLASSES)
        batches = [jax.device_put(b) for b in _batches(batch_size, CHECK_STEPS + 1)]
        for mode, wrap in (("eager", EagerStep), ("traced", lambda f: TracedStep(f, donate_argnums=0))):
            step = wrap(make_train_step(model.apply, tx))
            state = create_train_state(model, tx, jax.random.key(0))
            losses = []
            for i, batch in enumerate(batches[:CHECK_STEPS]):
                t0 = time.perf_counter()
                state, metrics = step(state, batch)
                losses.append(float(metrics["loss"]))
                if i == 0:
                    hello["first_step_s"][f"{name}{batch_size}/{mode}"] = time.perf_counter() - t0
            state, probe = _timed(step, state, batches[-1], 2, jax.block_until_ready)
            key = f"{name}{batch_size}/{mode}"
            hello["losses"][key] = losses
            cells[key] = [step, state, batches[-1], _steps_for(probe, budget_s, most)]
    _serve(hello, cells, jax.block_until_ready)


def torch_worker(budget_s: float, most: int, workloads) -> None:
    sys.path.insert(0, str(HERE.parent))
    import _torch_steps as ts

    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from graphduo import runtime

    # PyTorch at its best gets the host-memory policy graphduo's workers run under: on glibc's default
    # malloc its CNN step at batch 256 mapped its large blocks afresh every step, up to 1.5x slower
    # (RESULTS.md section 5), which made the ratios of 2026-12-06 01:20 UTC flatter graphduo.
    memory_note = runtime.reuse_host_memory(runtime.DEFAULT_HOST_MEMORY)
    torch = ts.need_torch("experiments/trees.py")
    torch.set_num_threads(os.cpu_count())
    import jax  # only to draw graphduo's initial weights (this tree's models), as every other cell does

    from graphduo import build_model, create_train_state, make_optimizer

    settings = {**ts.settings(torch), "host_memory": memory_note}
    cells, hello = {}, {"settings": settings, "losses": {}, "first_step_s": {}, "graph_breaks": {}}
    for name, batch_size in workloads:
        model = build_model(name, INPUT_SHAPE, NUM_CLASSES)  # the very weights the graphduo cells start from
        params = create_train_state(model, make_optimizer("adam", LR), jax.random.key(0)).params
        batches = [ts.torch_batch(torch, b, name) for b in _batches(batch_size, CHECK_STEPS + 1)]
        for variant in ts.variants("cpu"):
            trainer = ts.TorchTrainer(torch, variant, name, params, lr=LR)
            key = f"{name}{batch_size}/torch-{variant}"
            losses = []
            for i, (x, y) in enumerate(batches[:CHECK_STEPS]):
                t0 = time.perf_counter()
                losses.append(float(trainer.step(x, y)))
                if i == 0:
                    hello["first_step_s"][key] = time.perf_counter() - t0
            hello["losses"][key] = losses
            hello["graph_breaks"][key] = trainer.graph_breaks

            def step(state, batch, trainer=trainer):
                return state, trainer.step(*batch)

            _, probe = _timed(step, None, batches[-1], 2, lambda _: None)
            cells[key] = [step, None, batches[-1], _steps_for(probe, budget_s, most)]
    _serve(hello, cells, lambda _: None)


def _serve(hello: dict, cells: dict, block) -> None:
    """Answer the parent: ``hello`` once, then one line of per-cell medians per ``time`` request."""
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            return
        out = {}
        for key, cell in cells.items():
            step, state, batch, steps = cell
            cell[1], out[key] = _timed(step, state, batch, steps, block)
        print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent.


class Worker:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"experiments/trees.py: error: worker {self.name} exited with status {code} before "
                             f"answering (its error is above)")
        return json.loads(line)

    def time(self) -> dict:
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _named(parser, text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        parser.error(f"{what} must be NAME=PATH, got {text!r}")
    return name, value


def build_parser():
    import _common

    parser = _common.make_parser(
        __doc__, "Time graphduo's eager and traced Adam steps (MLP and CNN, batch 32 and 256) from several "
                 "source trees at several JAX installs, with PyTorch's variants beside them, interleaved.")
    parser.add_argument("--tree", action="append", default=None, metavar="NAME=PATH",
                        help="a source tree (a checkout with src/graphduo); repeat it (by default this tree, as 'this')")
    parser.add_argument("--python", action="append", default=None, metavar="NAME=INTERPRETER",
                        help="a Python with JAX, Flax and optax installed; repeat it (by default this one, named "
                             "after its jax version)")
    parser.add_argument("--torch-python", default=None, metavar="INTERPRETER",
                        help="a Python with PyTorch, for PyTorch's variants (by default this one if torch imports "
                             "here, else none)")
    parser.add_argument("--rounds", type=_common.positive_int, default=None,
                        help="timing rounds (default 7; --quick: 1)")
    parser.add_argument("--budget", type=_common.positive_float, default=None,
                        help="seconds of timed steps per cell and round (default 0.6; --quick: 0.1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 32 only, one round, short measurements")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and step_time.png", DEFAULT_OUT))
    return parser


def parse_args(argv=None):
    import importlib.util

    import _common

    parser = build_parser()
    args = parser.parse_args(argv)
    trees = args.tree or [f"this={HERE.parents[1]}"]
    args.trees = dict(_named(parser, t, "--tree") for t in trees)
    for name, path in args.trees.items():
        if not (pathlib.Path(path) / "src" / "graphduo" / "__init__.py").is_file():
            parser.error(f"--tree {name}={path}: no src/graphduo/__init__.py there: give a graphduo checkout")
    if args.python:
        args.pythons = dict(_named(parser, p, "--python") for p in args.python)
    else:
        import jax

        args.pythons = {f"jax-{jax.__version__}": sys.executable}
    for name, path in args.pythons.items():
        if not os.access(path, os.X_OK):
            parser.error(f"--python {name}={path}: not an executable interpreter")
    if args.torch_python is None and importlib.util.find_spec("torch") is not None:
        args.torch_python = sys.executable
    args.rounds = args.rounds or (1 if args.quick else 7)
    args.budget = args.budget or (0.1 if args.quick else 0.6)
    args.most = 10 if args.quick else 50
    args.workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    args.out = _common.check_out(parser, args.out)
    return args


def start_workers(args) -> list[Worker]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    base["JAX_PLATFORMS"] = "cpu"
    workers = []
    for tree_name, tree in args.trees.items():
        for py_name, python in args.pythons.items():
            env = {**base, "PYTHONPATH": str(pathlib.Path(tree).resolve() / "src")}
            argv = [python, str(HERE), "--worker", "jax", str(args.budget), str(args.most), _workload_arg(args.workloads)]
            print(f"trees: starting {tree_name}/{py_name}...", file=sys.stderr, flush=True)
            workers.append(Worker(f"{tree_name}/{py_name}", argv, env))
    if args.torch_python:
        print("trees: starting torch (torch.compile compiles each workload: minutes)...", file=sys.stderr, flush=True)
        argv = [args.torch_python, str(HERE), "--worker", "torch", str(args.budget), str(args.most),
                _workload_arg(args.workloads)]
        workers.append(Worker("torch", argv, base))
    return workers


def check_losses(workers: list[Worker]) -> dict:
    """Every cell's first CHECK_STEPS losses against the first worker's traced step's."""
    reference = workers[0].hello["losses"]
    worst = 0.0
    for w in workers:
        for key, losses in w.hello["losses"].items():
            ref = reference[key.split("/")[0] + "/traced"]
            worst = max(worst, *(abs(a - r) / max(1.0, abs(r)) for a, r in zip(losses, ref)))
    return {"steps": CHECK_STEPS, "max_rel_diff": worst, "rtol": LOSS_RTOL, "ok": worst <= LOSS_RTOL}


def analyse(workers: list[Worker], rounds: list[dict], workloads) -> dict:
    """Per workload: every cell's median over rounds; PyTorch's fastest variant; ratios (median of
    per-round ratios) of each tree against the first tree, and of each cell against PyTorch's
    fastest variant of the same round."""
    out = {}
    first_tree = workers[0].name.split("/")[0]
    for name, batch_size in workloads:
        wl = f"{name}{batch_size}"
        per_round = [{f"{w}/{k.split('/')[1]}": v for w, times in r.items() for k, v in times.items()
                      if k.split("/")[0] == wl} for r in rounds]
        cells = sorted(per_round[0])
        medians = {c: statistics.median(r[c] for r in per_round) for c in cells}
        torch_cells = [c for c in cells if c.startswith("torch/")]
        fastest = min(torch_cells, key=medians.get) if torch_cells else None
        ratios = {}
        for c in cells:
            if c.startswith("torch/"):
                continue
            tree, py, mode = c.split("/")
            base = f"{first_tree}/{py}/{mode}"
            if tree != first_tree and base in medians:
                ratios[f"{c} vs {base}"] = statistics.median(r[base] / r[c] for r in per_round)
            if fastest:
                # per round against that round's fastest torch variant: > 1 means graphduo is faster
                ratios[f"{c} vs torch fastest"] = statistics.median(
                    min(r[t] for t in torch_cells) / r[c] for r in per_round)
        out[wl] = {"median_ms": medians, "torch_fastest": fastest, "ratios": ratios}
    return out


def write_summary(out: pathlib.Path, payload: dict) -> None:
    lines = ["# trees: graphduo's steps from several source trees and JAX installs, PyTorch beside", "",
             f"Command: `{payload['command']}`  ", f"Recorded: {payload['recorded_utc']}, wall time "
             f"{payload['wall_s']:.0f} s, {payload['rounds']} rounds.  ",
             f"Machine: {payload['machine']}.", ""]
    lines += ["Workers (each applied its own tree's entry-point settings):", ""]
    for name, hello in payload["workers"].items():
        settings = hello["settings"]
        lines.append(f"- `{name}`: {hello.get('jax', 'torch ' + str(settings.get('torch')))}; "
                     f"{json.dumps(settings)}")
    check = payload["loss_check"]
    lines += ["", f"Same function: the first {check['steps']} losses of every cell agree within relative "
                  f"{check['rtol']:g} (largest difference {check['max_rel_diff']:.2e}): "
                  f"{'yes' if check['ok'] else 'NO'}.", ""]
    for wl, a in payload["analysis"].items():
        lines += [f"## {wl}", "", "| cell | median ms |", "|---|---:|"]
        for c, ms in a["median_ms"].items():
            mark = " (PyTorch's fastest)" if c == a["torch_fastest"] else ""
            lines.append(f"| {c}{mark} | {ms:.3f} |")
        lines += ["", "| ratio (median of per-round ratios; > 1: the first is faster) | |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in a["ratios"].items()]
        lines.append("")
    breaks = {k: v for w in payload["workers"].values() for k, v in w.get("graph_breaks", {}).items() if v}
    if breaks:
        lines += ["## torch.compile's graph breaks (first call)", ""]
        lines += [f"- {k}: " + "; ".join(f"{r} (x{n})" for r, n in v.items()) for k, v in breaks.items()]
        lines.append("")
    (out / "SUMMARY.md").write_text("\n".join(lines))


def write_plot(out: pathlib.Path, analysis: dict) -> list[str]:
    import _common

    plt = _common.pyplot()
    if plt is None:
        return []
    import numpy as np

    workloads = list(analysis)
    cells = sorted({c for a in analysis.values() for c in a["median_ms"]})
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cells)), 4.5))
    width = 0.8 / len(cells)
    for i, c in enumerate(cells):
        ax.bar(np.arange(len(workloads)) + i * width, [analysis[w]["median_ms"].get(c, np.nan) for w in workloads],
               width, label=c)
    ax.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2, workloads)
    ax.set_yscale("log")
    ax.set_ylabel("ms per Adam step (median over rounds)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)
    plt.close(fig)
    return ["step_time.png"]


def _machine() -> str:
    from graphduo.timing import environment

    env = environment()  # the parent's: which CPU; each worker records its own versions
    return f"{env['cpu']}, {env['cpu_count']} cores"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, budget, most, workloads = sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), _workloads(sys.argv[5])
        (jax_worker if kind == "jax" else torch_worker)(budget, most, workloads)
        return 0
    import _common

    args = parse_args(argv)
    command = _common.command_line(argv)
    t_start = time.perf_counter()
    workers = start_workers(args)
    try:
        rounds = []
        for r in range(args.rounds):
            order = workers if r % 2 == 0 else workers[::-1]
            rounds.append({w.name: w.time() for w in order})
            print(f"trees: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            w.close()
    payload = {"command": command, "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": _machine(), "rounds": args.rounds,
               "trees": args.trees, "pythons": args.pythons,
               "workers": {w.name: w.hello for w in workers}, "per_round": rounds,
               "loss_check": check_losses(workers)}
    payload["analysis"] = analyse(workers, rounds, args.workloads)
    payload["wall_s"] = time.perf_counter() - t_start
    (args.out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_summary(args.out, payload)
    plots = write_plot(args.out, payload["analysis"])
    print((args.out / "SUMMARY.md").read_text())
    print(f"wrote {args.out}/results.json, SUMMARY.md" + "".join(f", {p}" for p in plots), file=sys.stderr)
    if not payload["loss_check"]["ok"]:
        print(f"experiments/trees.py: error: the cells' losses differ by {payload['loss_check']['max_rel_diff']:.2e} "
              f"(more than {LOSS_RTOL:g}): they do not compute the same step", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
