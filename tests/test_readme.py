"""README's promises hold: its library example runs as written, and CI runs its test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_library_example_runs_as_written(capsys):
    code = re.search(r"## As a library\n\n```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "compiled 1 time(s)" in out


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    install_and_run, install_and_test = commands[0], commands[1]
    assert install_and_run.endswith("graphduo compare")
    assert install_and_test.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -- '-e \".\\[dev\\]\" && python -m pytest' README.md" in ci
    assert re.search(r"-e \"\.\[dev\]\" && python -m pytest", install_and_test)
