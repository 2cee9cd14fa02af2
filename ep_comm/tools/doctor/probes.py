"""Small helpers the checks share: run a command under a time limit, keep the one line of its
output that matters, kill a probe process and everything it started."""
from __future__ import annotations

import os
import signal
import subprocess


def run_cmd(argv: list[str], timeout: float = 10.0) -> tuple[int | None, str]:
    """Run a command; (exit code or None when it could not run or timed out, its output)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return None, f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(argv)} did not finish within {timeout:g} s"
    except OSError as e:
        return None, f"{argv[0]}: {e}"
    return p.returncode, (p.stdout + p.stderr).strip()


def first_line(text: str, limit: int = 200) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def error_line(text: str, limit: int = 200) -> str:
    """The line of a failed command's output that names the error: the exception line that
    ends a Python traceback (whose first line only says "Traceback (most recent call
    last):"), else the first line."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call")]
    if starts:
        # Frames and source lines are indented; the exception line after the last (for a
        # chained exception: the outermost) traceback is not.
        exc = next((ln for ln in lines[starts[-1] + 1:] if not ln[0].isspace()), None)
        if exc is not None:
            return first_line(exc, limit)
    return first_line(text, limit)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a child started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait()
