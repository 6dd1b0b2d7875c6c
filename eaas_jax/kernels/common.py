"""What the kernel modules share: the environment switches between XLA's form
of an operation and a kernel of ours not yet the default (measured in the step
first), and the sizes Triton's blocks take."""

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


def powers_of_two(*sizes: int, at_least: int = 1) -> bool:
    """Whether every size is a power of two, at least `at_least` (a Triton
    block's dimensions are powers of two)."""
    return all(n >= at_least and n & (n - 1) == 0 for n in sizes)
