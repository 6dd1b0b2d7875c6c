"""`batch --plot`: a PNG of a run, throughput over time and per-request latencies.

matplotlib is an optional extra (``pip install 'eaas-jax[plot]'``); the command
line checks for it before any model work (:func:`check_available`).
"""

from __future__ import annotations

import importlib.util

from eaas_jax.batch.runner import BatchSummary

__all__ = ["PlotUnavailableError", "check_available", "write_plot"]


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def check_available() -> None:
    """Raises PlotUnavailableError, saying how to install it, when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailableError("--plot needs matplotlib: pip install 'eaas-jax[plot]'")


def _throughput(summary: BatchSummary, bins: int = 30) -> tuple[list[float], list[float]]:
    """Tokens/s in `bins` equal intervals of the run (results come in bursts:
    a rate between two results of one step would be meaningless)."""
    end = max([summary.seconds, *(t for t, _ in summary.timeline)]) or 1.0
    edges = [end * i / bins for i in range(bins + 1)]

    def tokens_by(t: float) -> int:
        return max([0, *(n for when, n in summary.timeline if when <= t)])

    counts = [tokens_by(b) - tokens_by(a) for a, b in zip(edges, edges[1:])]
    return edges, [c / (end / bins) for c in counts]


def write_plot(summary: BatchSummary, path: str, title: str = "batch run") -> None:
    """Writes `path` (PNG): tokens generated over the run's time with the
    throughput of each interval, and the time to first token and per output
    token of every request, in the order they finished."""
    check_available()
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), constrained_layout=True)
    times = [t for t, _ in summary.timeline]
    tokens = [n for _, n in summary.timeline]
    top.plot([0.0, *times], [0, *tokens], color="tab:blue", drawstyle="steps-post")
    top.set_xlabel("seconds since the start")
    top.set_ylabel("tokens generated", color="tab:blue")
    rate = top.twinx()
    edges, rates = _throughput(summary)
    rate.stairs(rates, edges, color="tab:orange", alpha=0.7)
    rate.set_ylabel("tokens/s", color="tab:orange")
    top.set_title(f"{title}: {summary.completed} completed, {summary.generated_tokens} tokens in "
                  f"{summary.seconds:.1f} s")
    bottom.plot(range(1, len(summary.ttft_s) + 1), summary.ttft_s, ".", color="tab:green")
    bottom.set_xlabel("request (in finishing order)")
    bottom.set_ylabel("TTFT, s", color="tab:green")
    if summary.tpot_s:
        per_token = bottom.twinx()
        per_token.plot(range(1, len(summary.tpot_s) + 1), [t * 1e3 for t in summary.tpot_s], ".", color="tab:red")
        per_token.set_ylabel("time per output token, ms", color="tab:red")
    fig.savefig(path, dpi=100)
    plt.close(fig)
