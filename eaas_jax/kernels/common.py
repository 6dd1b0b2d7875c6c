"""What the kernel modules share: the environment switches between a kernel of
ours and XLA's form of the same operation (what benchmarks compare it with,
and a way back), and the sizes Triton's blocks take."""

from __future__ import annotations

import functools
import os


@functools.cache
def kernel_switched_on(variable: str, default: str = "kernel") -> bool:
    """Whether environment `variable` ('kernel' or 'xla'; unset: `default`,
    'xla' for a kernel not yet measured in the step) asks for the kernel.
    Read once a process (a program traced later sees the same)."""
    choice = os.environ.get(variable, default)
    if choice not in ("kernel", "xla"):
        raise ValueError(f"{variable} must be 'kernel' or 'xla', got {choice!r}")
    return choice == "kernel"


def powers_of_two(*sizes: int, at_least: int = 1) -> bool:
    """Whether every size is a power of two, at least `at_least` (a Triton
    block's dimensions are powers of two)."""
    return all(n >= at_least and n & (n - 1) == 0 for n in sizes)
