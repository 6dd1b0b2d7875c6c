"""The environment switches between XLA's form of an operation and a kernel
of ours that is not yet the default (measured in the step first)."""

from __future__ import annotations

import functools
import os


@functools.cache
def kernel_switched_on(variable: str) -> bool:
    """Whether environment `variable` ('xla', the default, or 'kernel') asks
    for the kernel. Read once a process (a program traced later sees the same)."""
    choice = os.environ.get(variable, "xla")
    if choice not in ("xla", "kernel"):
        raise ValueError(f"{variable} must be 'xla' or 'kernel', got {choice!r}")
    return choice == "kernel"
