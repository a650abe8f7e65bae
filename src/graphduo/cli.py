"""The ``graphduo`` command: parse arguments, call the library, report. No training logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import types
import typing

from graphduo import runtime
from graphduo.config import Config, ConfigError, lasting_spec
from graphduo.data import DataError
from graphduo.export import ExportError

MODEL_FIELDS = ("mlp_features", "cnn_channels", "cnn_dense", "resnet_width", "resnet_stages", "rnn_cell", "rnn_hidden",
                "rnn_loop", "vit_patch", "vit_dim", "vit_depth", "vit_heads")  # how each built-in model is built
EXIT_USAGE = 2  # bad input: nothing was written
EXIT_FAILED = 1  # the run started and failed (diverged, modes disagree)

DESCRIPTION = """\
graphduo trains the same Flax models in two paradigms and measures what compiling buys:
  eager   op by op, define-by-run (PyTorch's dynamic graph); every op pays dispatch overhead
  traced  the whole step traced once and compiled by XLA with jax.jit (a static graph)

examples:
  graphduo compare                               # default CNN on digits, both modes, side by side
  graphduo compare --model mlp --batch-size 256 --json
  graphduo compare --model examples/linen_model.py:make     # your own Flax module
  graphduo train --model mlp --mode eager --optimizer sgd --lr 0.05 --epochs 5
  graphduo train --dataset mnist --data-dir ~/data --download --steps 2000 --json
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), not a usage dump."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation) -> type:
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing), vars(types))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_arguments(parser: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None,
                         defaults: dict | None = None, helps: dict | None = None) -> None:
    """Add one flag per ``Config`` field (or the fields in ``only``), help and choices included;
    ``helps`` rewords a field's help for a command where the training wording does not fit."""
    defaults, helps = defaults or {}, helps or {}
    for f in dataclasses.fields(Config):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        default = defaults.get(f.name, f.default)
        kind = _scalar_type(f.type)
        help_text = helps.get(f.name, meta["help"])
        if kind is bool:
            parser.add_argument(_flag(f.name), action="store_true", default=default, help=help_text)
            continue
        parse = meta.get("parse") or kind
        sep = "x" if meta.get("metavar") == "HxWxC" else ","
        shown = sep.join(map(str, default)) if isinstance(default, tuple) else default
        if default is not None and "default" not in help_text:
            help_text += f" (default: {shown})"
        parser.add_argument(_flag(f.name), type=_checked(parse, f.name), default=default,
                            choices=meta.get("choices"), metavar=meta.get("metavar"), help=help_text)


def _checked(parse, name):
    def convert(text):
        try:
            return parse(text)
        except (ValueError, ConfigError) as err:
            raise argparse.ArgumentTypeError(f"invalid value {text!r} for {_flag(name)}: {err}") from None

    convert.__name__ = getattr(parse, "__name__", name)
    return convert


def apply_process_settings(cpu_convolutions: str = runtime.DEFAULT_CPU_CONVOLUTIONS,
                           host_memory: str = runtime.DEFAULT_HOST_MEMORY) -> runtime.ProcessSettings:
    """An entry point's first call, before any JAX computation: puts the ``XLA_FLAGS`` value for
    ``cpu_convolutions`` into the environment, applies ``host_memory``, and returns what it did.
    It lives here, in the CLI's module, because it is entry-point code: the CLI, the experiment
    scripts and the test suite's conftest call it; the library's modules only compute the settings
    (``graphduo.runtime``) and never apply them."""
    flags, flags_note = runtime.cpu_convolution_flags(cpu_convolutions)
    os.environ["XLA_FLAGS"] = flags
    memory_note = runtime.reuse_host_memory(host_memory)
    return runtime.ProcessSettings(cpu_convolutions, host_memory, flags, (flags_note, memory_note))


def _config_from(args, fields) -> Config:
    values = {name: getattr(args, name) for name in fields}
    if "model" in values:
        values["model"] = lasting_spec(values["model"])
    return Config(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphduo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"graphduo {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser("train", help="train one model in one mode, evaluating every epoch",
                           description="Train a model in eager or traced mode with a live progress bar; "
                                       "evaluate on the held-out split every epoch; write metrics as JSON "
                                       "lines into the run directory.",
                           epilog="examples: graphduo train --model mlp --mode eager --epochs 5; graphduo train "
                                  "--steps 2000 --checkpoint-every 500 --run-dir runs/a (run it again to resume); "
                                  "graphduo train --dataset mnist --data-dir ~/data --download --json")
    add_config_arguments(train)
    _add_output_flags(train, "print the final summary as one JSON object on stdout")

    compare = sub.add_parser(
        "compare", help="train the same steps in both modes and compare their speed",
        description="Train the same model for the same steps from identical parameters and batches, "
                    "once eagerly and once traced; check both reach the same loss; report time to first "
                    "step, steady-state step time, samples/s, the speedup and the break-even step count.",
        epilog="examples: graphduo compare; graphduo compare --model mlp --batch-size 256 --json; "
               "graphduo compare --dataset synthetic --synthetic-shape 32x32x3 --steps 50; "
               "graphduo compare --model mlp --eager-update fused --steps-per-call 16")
    compare_fields = ("model", "dataset", "optimizer", "lr", "batch_size", "steps", "seed",
                      "data_dir", "download", "synthetic_shape", "synthetic_size", *MODEL_FIELDS,
                      "eager_update", "steps_per_call", "unroll", "cpu_convolutions", "host_memory")
    add_config_arguments(compare, only=compare_fields, defaults={"steps": 200}, helps={
        "model": "model to compare", "steps": "steps to train in each mode",
        "eager_update": "the eager side's optimizer update: ops (op by op) or fused (one compiled op, as "
                        "PyTorch's fused Adam)",
        "steps_per_call": "the traced side's optimizer steps per executable (a lax.scan over K batches); the time "
                          "reported is per step, and the step count is rounded down to a multiple of K"})
    _add_output_flags(compare, "print the result as one JSON object on stdout", "no progress line on stderr")
    compare.set_defaults(config_fields=compare_fields)

    inspect = sub.add_parser(
        "inspect", help="show both graphs of one training step: compiled kernels and eager ops",
        description="Inspect one training step in both paradigms. traced: jaxpr equations by primitive, HLO "
                    "instructions before and after XLA's optimization passes, fusions (kernels) per step and the "
                    "library that runs each (XLA's own loops, YNNPACK, Eigen; cuBLAS, cuDNN on a GPU), FLOPs, "
                    "bytes, memory, and the graph as Graphviz DOT. eager: every op dispatched in one step, in "
                    "order, each timed to completion, grouped by primitive and phase (forward, backward, update).",
        epilog="examples: graphduo inspect --model mlp --batch-size 256; graphduo inspect --format dot > step.dot; "
               "graphduo inspect --model cnn --dataset synthetic --synthetic-shape 28x28x1 --svg step.svg; "
               "graphduo inspect --model mlp --steps-per-call 8")
    inspect_fields = ("model", "dataset", "optimizer", "lr", "batch_size", "seed", "data_dir", "synthetic_shape",
                      *MODEL_FIELDS, "steps_per_call", "unroll", "cpu_convolutions", "host_memory")
    add_config_arguments(inspect, only=inspect_fields, helps={
        "model": "model whose training step to inspect", "lr": "the optimizer's learning rate in the step",
        "batch_size": "batch size of the inspected step",
        "steps_per_call": "also compile K steps as one executable (a lax.scan) and show the loop in its graph"})
    inspect.add_argument("--format", choices=("text", "json", "dot"), default="text",
                         help="text: a report; json: every figure and every eager op; dot: the optimized graph "
                              "(default: text)")
    inspect.add_argument("--svg", metavar="FILE", help="also render the optimized graph to FILE with Graphviz's dot")
    inspect.set_defaults(config_fields=inspect_fields)

    export = sub.add_parser(
        "export", help="write a trained run's model (or its training step) as a jax.export artefact",
        description="Export a finished run's model as its inference function (logits = f(images), parameters "
                    "baked in, any batch size) with jax.export, written as the bytes of Exported.serialize(). "
                    "The artefact loads in any JAX program, without graphduo, Flax or the model's code: "
                    "jax.export.deserialize(open(FILE, 'rb').read()).call(images). Images as graphduo's data sets "
                    "give them: float32 NHWC, standardized with the training split's per-channel statistics. "
                    "--what train-step exports the training step itself (optimizer included) and writes the "
                    "state it starts from beside it (FILE.state.npz), so training can go on without the code.",
        epilog="examples: graphduo export runs/cnn --out cnn.jaxexport; graphduo export runs/cnn --step 400 --out "
               "cnn-400.jaxexport --platforms cpu,cuda; graphduo export runs/mlp --what train-step --out step.jaxexport")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the --run-dir of a graphduo train run")
    export.add_argument("--out", required=True, metavar="FILE", help="the artefact to write")
    export.add_argument("--step", type=int, default=None, metavar="N",
                        help="export the checkpoint of step N (default: the run's final parameters)")
    export.add_argument("--platforms", default=None, metavar="P,P",
                        help="platforms the artefact runs on, of cpu, cuda, rocm, tpu (default: this machine's)")
    export.add_argument("--what", choices=("inference", "train-step"), default="inference",
                        help="inference: logits = f(images); train-step: (state, batch) -> (state, metrics) "
                             "(default: inference)")
    export.set_defaults(config_fields=())

    predict = sub.add_parser(
        "predict", help="run an exported model: evaluate it on a data set, or predict images from a .npy file",
        description="Load an artefact written by graphduo export exactly as any JAX program would "
                    "(jax.export.deserialize(...).call(images)) and evaluate it on a data set's test split "
                    "(accuracy, loss, samples/s), or write its logits for the images of a .npy file.",
        epilog="examples: graphduo predict cnn.jaxexport --dataset digits; graphduo predict cnn.jaxexport --images "
               "x.npy --out logits.npy")
    predict.add_argument("artefact", metavar="FILE", help="an artefact written by graphduo export (inference)")
    predict_fields = ("dataset", "data_dir", "download", "synthetic_shape", "synthetic_size", "seed")
    add_config_arguments(predict, only=predict_fields, helps={
        "dataset": "data set whose test split to evaluate (images as graphduo's data sets give them)",
        "seed": "seed of --dataset synthetic (the one the run trained with)"})
    predict.add_argument("--images", metavar="X.npy", default=None,
                         help="predict these images instead (float32, N x H x W x C, standardized as the data set)")
    predict.add_argument("--out", metavar="Y.npy", default=None, help="with --images: where the logits go")
    predict.add_argument("--batch-size", type=int, default=512, help="images per call (default: 512)")
    _add_output_flags(predict, "print the result as one JSON object on stdout")
    predict.set_defaults(config_fields=predict_fields)

    launch = sub.add_parser(
        "launch", help="start P local processes of a multi-process run (a cluster rehearsal)",
        description="Start P processes of 'graphduo train' on this machine, joined through a coordinator on "
                    "127.0.0.1 at a free port, each with D devices (virtual CPU devices unless JAX_PLATFORMS "
                    "says otherwise): the one-machine rehearsal of a cluster run. Only process 0 reports.",
        epilog="example: graphduo launch --processes 2 --devices-per-process 2 -- train --strategy shard_map "
               "--model mlp --steps 100")
    launch.add_argument("--processes", type=int, default=2, help="number of processes (default: 2)")
    launch.add_argument("--devices-per-process", type=int, default=1, help="devices per process (default: 1)")
    launch.add_argument("--timeout", type=float, default=None,
                        help="stop every process after this many seconds (default: no limit)")
    launch.add_argument("--init-timeout", type=int, default=60,
                        help="seconds the processes wait for each other to start (default: 60)")
    launch.add_argument("child", nargs=argparse.REMAINDER, metavar="-- train ...",
                        help="the graphduo train command each process runs")
    train.set_defaults(config_fields=tuple(f.name for f in dataclasses.fields(Config)))
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("graphduo")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _add_output_flags(parser, json_help: str, quiet_help: str = "no progress bar") -> None:
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--quiet", action="store_true", help=quiet_help)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="graphduo: %(message)s", stream=sys.stderr)
    prog = f"graphduo {args.command}"
    if args.command == "launch":
        from graphduo.launch import launch

        return launch(args, build_parser())
    try:
        config = _config_from(args, args.config_fields).validate()
        settings = setup_runtime(config)
        if args.command == "train":
            return _train(config, args)
        if args.command == "inspect":
            return _inspect(config, args)
        if args.command == "export":
            return _export(args)
        if args.command == "predict":
            return _predict(config, args)
        return _compare(config, args, settings)
    except (ConfigError, DataError, ExportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def setup_runtime(config: Config):
    """Process-wide settings (XLA's flags, read once at backend start; glibc's malloc policy), the
    devices and the distributed runtime: the entry point's job, never a library module's. Returns
    the ``graphduo.runtime.ProcessSettings`` applied, for the results to record.

    ``--devices N`` on a CPU creates N virtual devices. A multi-process run joins the others
    through ``jax.distributed.initialize``; a watchdog turns a peer that never arrives into a
    one-line error instead of an abort.
    """
    settings = apply_process_settings(config.cpu_convolutions, config.host_memory)  # before JAX starts
    import jax

    if config.debug_nans:
        jax.config.update("jax_debug_nans", True)
    if config.devices is not None:
        try:
            jax.config.update("jax_num_cpu_devices", config.devices)
        except RuntimeError:
            pass  # backends already started (library use, tests): the devices that exist are used
    if config.multi_process:
        _join_cluster(config)
    # A setting asked for that could not take effect here: say so once (a GPU ignores both).
    skipped = [note for note in settings.notes if "skipped" in note or "already started" in note]
    if skipped and jax.default_backend() == "cpu":
        for note in skipped:
            print(f"graphduo: {note}", file=sys.stderr)
    return settings


def _join_cluster(config: Config) -> None:
    """Join the other processes through ``jax.distributed.initialize``, or fail in one line."""
    import jax

    if config.coordinator is not None:
        where = f"{config.num_processes} processes at {config.coordinator}"
        kwargs = {"coordinator_address": config.coordinator, "num_processes": config.num_processes,
                  "process_id": config.process_id}
    else:
        where, kwargs = "the cluster's processes (auto-detected)", {}
    timeout = config.init_timeout
    joined = threading.Event()

    def watchdog():
        if not joined.wait(timeout):
            print(f"graphduo train: error: timed out after {timeout} s waiting for {where}: start every "
                  f"process with the same settings, or raise --init-timeout", file=sys.stderr, flush=True)
            os._exit(EXIT_FAILED)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        jax.distributed.initialize(initialization_timeout=timeout + 30, **kwargs)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"cannot join {where}: {str(err).splitlines()[0]}") from None
    finally:
        joined.set()


def _train(config: Config, args) -> int:
    from graphduo.checkpoint import CheckpointError
    from graphduo.train import Preempted, TrainingDiverged, train_and_evaluate

    try:
        summary = train_and_evaluate(config, progress=not args.quiet)
    except (TrainingDiverged, CheckpointError) as err:
        print(f"graphduo train: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except Preempted as stop:
        print(f"graphduo train: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except FloatingPointError as err:  # --debug-nans: JAX names the primitive that made the NaN
        print(f"graphduo train: error: {_first_line(err)} (found by --debug-nans)", file=sys.stderr)
        return EXIT_FAILED
    if summary["process_index"] != 0:
        return 0  # only process 0 reports
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['model']} ({summary['mode']}) on {summary['dataset']}: {summary['steps']} steps, "
              f"test accuracy {summary['test_accuracy']:.2%}, final loss {summary['final_loss']:.4f}, "
              f"{summary['step_time_ms']:.3f} ms/step ({summary['samples_per_s']:,.0f} samples/s), "
              f"compile {summary['compile_time_s']:.2f} s; metrics in {summary['run_dir']}")
    return 0


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _inspect(config: Config, args) -> int:
    import shutil

    from graphduo import graphs, paths
    from graphduo.train import prepare

    if args.svg:
        if shutil.which("dot") is None:
            raise ConfigError("--svg needs Graphviz's dot program: install graphviz (apt-get install graphviz), "
                              "or use --format dot")
        try:
            paths.output_file(args.svg, "--svg", "step.svg")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    run = prepare(config)
    state, batch = graphs.example_inputs(run.model, run.tx, config.batch_size, config.seed)
    traced_graph = graphs.inspect_traced(run.model, run.tx, state, batch, steps_per_call=config.steps_per_call,
                                         unroll=config.unroll)
    dot = graphs.hlo_to_dot(traced_graph["optimized_hlo"], traced_graph["platform"])
    if args.format == "dot":
        print(dot)
    else:
        eager_graph = graphs.inspect_eager(run.model, run.tx, state, batch)
        if args.format == "json":
            print(json.dumps(graphs.summary(traced_graph, eager_graph)))
        else:
            print(graphs.format_report(config.model, config.batch_size, traced_graph, eager_graph))
    if args.svg:
        _render_svg(dot, args.svg)
        print(f"graphduo inspect: wrote {args.svg}", file=sys.stderr)
    return 0


def _render_svg(dot: str, path: str) -> None:
    """Graphviz's ``dot -Tsvg`` into ``path``, all or nothing: it writes a temporary file beside
    ``path`` and renames it; on failure ``ConfigError`` with dot's first line and no file."""
    import pathlib
    import subprocess
    import tempfile

    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        done = subprocess.run(["dot", "-Tsvg", "-o", tmp], input=dot, text=True, capture_output=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
            raise ConfigError(f"Graphviz's dot could not render {path}: {reason}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _export(args) -> int:
    from graphduo import export, paths

    try:
        paths.output_file(args.out, "--out", "model.jaxexport")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()] if args.platforms else None
    run = export.load_run(args.run_dir, args.step)
    if args.what == "inference":
        exported = export.export_inference(run.model, run.params, run.model_state, platforms=platforms)
        size = export.save(exported, args.out)
    else:
        state = run.state if run.state is not None else _final_state(run)
        exported = export.export_train_step(run.model, run.tx, state, platforms=platforms)
        size = export.save_train_step(exported, state, args.out)
    where = f"step {run.step}" + ("" if args.step is not None else " (final)")
    print(f"graphduo export: wrote {args.out} ({size:,} bytes): {run.config.model} of {run.run_dir} at {where}, "
          f"{args.what}, platforms {', '.join(exported.platforms)}", file=sys.stderr)
    return 0


def _final_state(run):
    """A train-step export without --step: the run's newest checkpoint if it is its final step, else
    a clear error (the final optimizer state is only ever saved in a checkpoint)."""
    from graphduo import export

    steps = sorted(int(p.name) for p in (run.run_dir / "checkpoints").glob("[0-9]*")) \
        if (run.run_dir / "checkpoints").is_dir() else []
    if run.step not in steps:
        raise ExportError(f"{run.run_dir} has no checkpoint of its final step {run.step}, which a train step needs "
                          f"(its optimizer state): train with --checkpoint-every, or give --step with one of "
                          f"{', '.join(map(str, steps)) or 'its checkpoints (none)'}")
    return export.load_run(run.run_dir, run.step).state


def _predict(config: Config, args) -> int:
    import numpy as np

    from graphduo import export, paths

    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if (args.images is None) != (args.out is None):
        raise ConfigError("--images and --out go together: give both, or neither to evaluate --dataset")
    if args.out is not None:
        try:
            paths.output_file(args.out, "--out", "logits.npy")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    exported = export.load(args.artefact)
    if len(exported.in_avals) != 1:
        raise ExportError(f"{args.artefact} is a training step ({len(exported.in_avals)} inputs), not a model: "
                          f"export the run with --what inference")
    if args.images is not None:
        try:
            images = np.load(args.images, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ExportError(f"--images {args.images} is not a readable .npy file ({_first_line(err)})") from None
        images = export.check_images(exported, images, f"--images {args.images}")
        logits = export.predict_logits(exported, images, args.batch_size)
        _save_npy(logits, args.out)
        print(f"graphduo predict: wrote {args.out}: logits of {len(images)} images, shape {logits.shape}",
              file=sys.stderr)
        return 0
    from graphduo.data import load_dataset

    ds = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download,
                      synthetic_shape=tuple(config.synthetic_shape), synthetic_size=config.synthetic_size,
                      seed=config.seed)
    images = export.check_images(exported, ds.x_test, f"the {config.dataset} test split")
    result = {"artefact": args.artefact, "dataset": config.dataset,
              **export.evaluate(exported, images, ds.y_test, args.batch_size)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.artefact} on {config.dataset} ({result['count']} test images): test accuracy "
              f"{result['test_accuracy']:.2%}, test loss {result['test_loss']:.4f}, {result['samples_per_s']:,.0f} "
              f"samples/s (first call, where XLA compiles it: {result['first_call_s']:.2f} s)")
    return 0


def _save_npy(array, path: str) -> None:
    import pathlib

    import numpy as np

    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _compare(config: Config, args, settings) -> int:
    from graphduo.compare import compare, format_table

    def announce(line: str) -> None:
        print(f"graphduo compare: {line}", file=sys.stderr)

    result = compare(config, announce=None if args.quiet else announce, process_settings=settings.record())
    print(json.dumps(result) if args.json else format_table(result))
    if not result["same_loss"]:
        print(f"graphduo compare: error: eager and traced ended at different losses "
              f"({result['modes']['eager']['final_loss']} vs {result['modes']['traced']['final_loss']})",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
