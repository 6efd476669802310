"""Run ``starquant`` as a user does: the installed console script in a subprocess, offline
(no Hub), one thread. Shared by the command tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def starquant_command() -> list[str]:
    """The ``starquant`` script of this interpreter's environment (``pip install`` puts it
    beside ``python``), else the module."""
    script = shutil.which("starquant", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "starquant_plugin.cli"]


def starquant(*args: object, cwd: Path, timeout: int = 1800,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*starquant_command(), *map(str, args)], cwd=cwd,
                          env={**os.environ, **OFFLINE, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *phrases: str,
                      code: int = 1) -> str:
    """A user error: exit ``code``, no traceback, one ``error:`` line holding ``phrases``;
    returns that line."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]
