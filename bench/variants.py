"""Each benchmark variant runs in a process of its own (its own peak memory, its own Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_variant(script: str, args: list[str]) -> dict | None:
    """Run ``script --variant NAME ...``; return the JSON it printed after ``RESULT``, or None on failure."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO)
    line = next((li for li in proc.stdout.splitlines() if li.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(line.removeprefix("RESULT "))
