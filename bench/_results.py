"""What every bench script does with its table: name the commit, print, append."""

from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def publish(lines: list[str], append_to: str | None) -> None:
    """Prints the table and appends it to `append_to` (bench/RESULTS.md) if given."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    if append_to:
        with open(append_to, "a") as f:
            f.write("\n" + text)
