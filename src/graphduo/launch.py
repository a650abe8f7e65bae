"""``graphduo launch``: P local processes of one multi-process run, the rehearsal of a cluster job.

Each process is ``python -m graphduo train ...`` with ``--coordinator 127.0.0.1:<free port>
--num-processes P --process-id i --devices D``. The launcher forwards Ctrl-C, and when one process
fails it stops the others (a JAX peer whose partner died would otherwise abort only after its
heartbeat timeout) and exits with the failed process's status.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

EXIT_USAGE = 2
RESERVED = ("--coordinator", "--num-processes", "--process-id", "--devices", "--distributed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error(message: str) -> int:
    print(f"graphduo launch: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def launch(args, parser) -> int:
    command = list(args.child)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        return _error("give the command to run after --, e.g. graphduo launch --processes 2 -- train "
                      "--strategy shard_map")
    if command[0] != "train":
        return _error(f"launch runs 'train' only, not {command[0]!r}: graphduo launch --processes 2 -- train "
                      "--strategy shard_map")
    if args.processes < 1 or args.devices_per_process < 1:
        return _error("--processes and --devices-per-process must be positive integers")
    clash = [flag for flag in RESERVED if any(a == flag or a.startswith(flag + "=") for a in command)]
    if clash:
        return _error(f"launch sets {', '.join(clash)} itself: use --processes and --devices-per-process")
    port = free_port()

    def argv(i: int) -> list[str]:
        return [*command, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.processes),
                "--process-id", str(i), "--devices", str(args.devices_per_process),
                "--init-timeout", str(args.init_timeout)]

    parser.parse_args(argv(0))  # a usage error is reported once, here, not by every process
    env = {**os.environ}
    env.setdefault("JAX_PLATFORMS", "cpu")
    # Own sessions: a terminal's Ctrl-C reaches the launcher alone, which forwards it exactly once.
    procs = [subprocess.Popen([sys.executable, "-m", "graphduo", *argv(i)], env=env, start_new_session=True)
             for i in range(args.processes)]
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    forwarded: list[int] = []

    def forward(signum, frame):
        # A preemption (SIGTERM) or Ctrl-C reaches every process, which checkpoint and stop together.
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _wait(procs, deadline, forwarded)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen], deadline: float | None, forwarded: list[int]) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if forwarded:  # stopping on request: let every process finish its checkpoint
            if all(c is not None for c in codes):
                sig = forwarded[0]
                print(f"graphduo launch: stopped by {signal.Signals(sig).name}; exit statuses "
                      f"{', '.join(map(str, codes))}", file=sys.stderr)
                return 128 + sig
            time.sleep(0.1)
            continue
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            _stop(procs, signal.SIGTERM)
            print(f"graphduo launch: error: process {i} exited with {_describe(code)}; stopped the others",
                  file=sys.stderr)
            return code if code > 0 else 1
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            _stop(procs, signal.SIGTERM)
            print("graphduo launch: error: --timeout reached; stopped every process", file=sys.stderr)
            return 1
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen], sig: int, grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(end - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
