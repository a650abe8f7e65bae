"""README's promises hold: its library example runs as written, and CI runs its test commands."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_library_example_runs_as_written(capsys):
    code = re.search(r"## As a library\n\n```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "compiled 1 time(s)" in out


def test_own_model_example_runs_as_written(capsys):
    """The second library example, a user's linen module with BatchNorm and dropout, run after the first."""
    section = README.split("## As a library", 1)[1].split("\n## ", 1)[0]
    first, second = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    namespace = {}
    exec(compile(first, "README.md", "exec"), namespace)
    capsys.readouterr()
    exec(compile(second, "README.md", "exec"), namespace)
    assert "model state: ['batch_stats']" in capsys.readouterr().out


def test_ci_runs_the_readme_test_commands():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    install_and_run, install_and_test = commands[0], commands[1]
    assert install_and_run.startswith("python3 -m venv") and install_and_run.endswith("graphduo compare")
    assert install_and_test.startswith("python3 -m venv") and install_and_test.endswith("python -m pytest -q")
    assert '-c constraints.txt -e ".[dev]" && python -m pytest' in install_and_test
    # the newest-JAX pair, for Python 3.12+: the same job and the same suite
    newest = next(c for c in commands if "constraints-py312.txt" in c)
    lines = newest.splitlines()
    assert lines[0].startswith("python3.12 -m venv") and lines[0].endswith("graphduo compare")
    assert lines[1].startswith("python3.12 -m venv") and lines[1].endswith("python -m pytest -q")
    assert lines[1].replace("constraints-py312.txt", "constraints.txt").replace(".venv312", ".venv").replace(
        "python3.12 ", "python3 ") == install_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -- '-c constraints.txt -e \".\\[dev\\]\" && python -m pytest' README.md" in ci
    assert "grep -m1 -- '-c constraints-py312.txt -e \".\\[dev\\]\" && python -m pytest' README.md" in ci
    for path in ("constraints.txt", "constraints-py312.txt"):
        pins = dict(line.split("==") for line in (ROOT / path).read_text().splitlines()
                    if line and not line.startswith("#"))
        assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint"} <= pins.keys(), path
