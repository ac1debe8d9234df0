"""Every ``tinyonn-train`` / ``tinyonn-eval`` command of README.md runs as written and exits 0.

The commands come from the README's ```bash blocks (backslash-continued lines joined, a
``pip install ... &&`` prefix and trailing ``# comments`` dropped) and run in README order through
the installed console scripts, in a temporary directory holding a copy of ``configs/`` so their
``runs/...`` workdirs land there. Only budget flags are appended: a few steps and tasks for
``tinyonn-train`` (a later ``--set`` wins), two tasks and two views for ``tinyonn-eval``
(argparse: the last value wins). The commands share a JAX compilation cache in the temporary
directory, so a step compiled by one command is not compiled again by the next.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCRIPTS = ("tinyonn-train", "tinyonn-eval")
TRAIN_BUDGET = ("--quiet", "--set", "train.num_steps={steps}", "--set", "train.ckpt_every=1",
                "--set", "data.max_tasks=2", "--set", "train.eval_every=0",
                "--set", "train.plot_every=1")
EVAL_BUDGET = ("--max-tasks", "2", "--views", "2")


def readme_commands(text: str) -> list[list[str]]:
    """The ``tinyonn-*`` commands of the ```bash blocks of ``text``, as argv lists, in order."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            argv = shlex.split(line, comments=True)
            if "&&" in argv:  # pip install ... && <command>
                argv = argv[len(argv) - argv[::-1].index("&&"):]
            if argv and argv[0].startswith("tinyonn-"):
                commands.append(argv)
    return commands


def _flag(argv: list[str], name: str) -> str | None:
    """The last value of ``--name VALUE`` in ``argv``."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


def _with_budget(argv: list[str]) -> list[str]:
    if argv[0] == "tinyonn-train":
        steps = 3 if "--resume" in argv else 2  # a resumed run continues past the first one
        return [*argv, *(a.format(steps=steps) for a in TRAIN_BUDGET)]
    return [*argv, *EVAL_BUDGET]


def _script(name: str) -> str:
    """The installed console script ``name`` of this interpreter's environment."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"console script {name} is not installed (pip install -e .)"
    return found


def test_readme_commands_are_found():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 4, commands
    assert {c[0] for c in commands} <= set(SCRIPTS), [c[0] for c in commands]
    assert any(c[0] == "tinyonn-train" and "--resume" in c for c in commands)
    trained: set[str] = set()
    for c in commands:  # every evaluated workdir was trained by an earlier README command
        if c[0] == "tinyonn-train":
            trained.add(_flag(c, "--workdir"))
        else:
            assert _flag(c, "--workdir") in trained, c


def test_readme_commands_run(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    commands = readme_commands(README.read_text())
    assert len(commands) >= 4, commands
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           **os.environ, "COLUMNS": "120"}
    for argv in commands:
        full = [_script(argv[0]), *_with_budget(argv)[1:]]
        start = time.perf_counter()
        try:
            proc = subprocess.run(full, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=300, env=env)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"README command timed out after {e.timeout}s: {shlex.join(argv)}")
        assert proc.returncode == 0, (
            f"README command exited {proc.returncode}: {shlex.join(argv)}\n"
            f"run as: {shlex.join(_with_budget(argv))}\n"
            f"stdout (tail):\n{proc.stdout[-2000:]}\nstderr (tail):\n{proc.stderr[-3000:]}"
        )
        print(f"{time.perf_counter() - start:6.1f} s  {shlex.join(argv)}")
