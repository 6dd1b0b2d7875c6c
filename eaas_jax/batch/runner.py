"""A batch run: every request of an input file through one engine, each
result written the moment its request finishes (``results.ResultsFile``).

SIGINT and SIGTERM stop the run after the step in progress, whose finished
results are written first; the run then says how to resume (the same command
again: what is in the output is skipped). Requests already in the output are
not run at all.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time

from tqdm.auto import tqdm

from eaas_jax.batch.formats import BadLine, BatchRequest, error_record, result_record
from eaas_jax.batch.results import ResultsFile
from eaas_jax.engine.prompts import chat_prompts

__all__ = ["BatchSummary", "describe", "quantile", "report", "run_batch", "summary_dict"]


@dataclasses.dataclass
class BatchSummary:
    """What a run did."""

    total: int  #: lines in the input
    skipped: int = 0  #: already in the output (resumed)
    completed: int = 0  #: results written by this run
    failed: int = 0  #: error records written by this run (bad lines, failed requests)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    interrupted: str | None = None  #: the signal that stopped the run
    #: per request: time to first token, from when it was queued (all are queued at the start)
    ttft_s: list[float] = dataclasses.field(default_factory=list)
    #: per request of more than one token: time per output token after the first
    tpot_s: list[float] = dataclasses.field(default_factory=list)
    #: per result written: (seconds since the start, tokens generated so far): the run's timeline
    timeline: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    warmup_s: float = 0.0  #: compiling the first steps' shapes before the first step
    warmup_shapes: int = 0  #: step shapes warm-up foresaw (compiled first, in the background, or left)
    compile_waits: int = 0  #: steps that waited for their program to compile (foreseen too late, or not)

    @property
    def left(self) -> int:
        return self.total - self.skipped - self.completed - self.failed


class _StopOnSignal:
    """SIGINT/SIGTERM set a flag the run checks between steps (main thread only)."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        # A second signal is not asked twice: it acts as it would have (a
        # step stuck on a server must not need SIGKILL).
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_batch(engine, items: list[BatchRequest | BadLine], results: ResultsFile, *, model: str,
              use_tqdm: bool = True, warmup: bool = True) -> BatchSummary:
    """Runs the requests of `items` that `results` has no record of;
    `warmup` first compiles the step shapes they will need (`Engine.warm_up`)."""
    summary = BatchSummary(total=len(items))
    todo = [item for item in items if item.custom_id not in results.done]
    summary.skipped = len(items) - len(todo)
    start = time.time()
    queued: dict[str, BatchRequest] = {}  # engine request id -> its batch request
    with _StopOnSignal() as stop:
        for item in todo:
            if isinstance(item, BadLine):
                results.write(error_record(item.custom_id, item.where, item.reason, item.openai_url))
                summary.failed += 1
                continue
            try:
                prompt = item.prompt if item.messages is None else chat_prompts(
                    engine.tokenizer, [item.messages], add_generation_prompt=True)[0]
                queued[engine.add_request(prompt, item.params)] = item
            except Exception as e:  # noqa: BLE001 - too long, bad tokens, no chat template...: that line's error
                results.write(error_record(item.custom_id, item.where, str(e) or type(e).__name__,
                                           item.openai_url))
                summary.failed += 1
        bar, waits_before = None, engine.runner.num_compile_waits
        try:
            if warmup and queued:
                warmup_start = time.time()
                plan = engine.warm_up(use_tqdm=use_tqdm)
                summary.warmup_s = time.time() - warmup_start
                summary.warmup_shapes = len(plan.first) + len(plan.later)
            bar = tqdm(total=len(queued), desc="batch", unit="req", disable=not use_tqdm)
            while queued and stop.received is None:
                for output in engine.step_finished():
                    if output.request_id not in queued:
                        continue
                    item = queued.pop(output.request_id)
                    results.write(result_record(item, output, model))
                    if output.error:
                        summary.failed += 1
                    else:
                        summary.completed += 1
                        summary.prompt_tokens += len(output.prompt_token_ids)
                        summary.generated_tokens += sum(len(c.token_ids) for c in output.outputs)
                        _record_latencies(summary, output)
                    summary.timeline.append((time.time() - start, summary.generated_tokens))
                    bar.update(1)
                    bar.set_postfix(tok_per_s=f"{summary.generated_tokens / max(time.time() - start, 1e-9):.0f}")
        finally:
            if bar is not None:
                bar.close()
            engine.stop_warm_up()
            for request_id in list(queued):  # interrupted: nothing of ours stays queued
                engine.abort_request(request_id)
    summary.interrupted = stop.received
    summary.seconds = time.time() - start
    summary.compile_waits = engine.runner.num_compile_waits - waits_before
    return summary


def _record_latencies(summary: BatchSummary, output) -> None:
    metrics = output.metrics
    if metrics.first_token_time is None:
        return
    summary.ttft_s.append(metrics.first_token_time - metrics.arrival_time)
    # The completions of one request advance together: the longest one's pace.
    longest = max(len(c.token_ids) for c in output.outputs)
    if longest > 1 and metrics.last_token_time is not None:
        summary.tpot_s.append((metrics.last_token_time - metrics.first_token_time) / (longest - 1))


def quantile(values: list[float], q: float) -> float | None:
    """The `q` quantile of `values`: the value of rank int(q * len) in order; None for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def summary_dict(summary: BatchSummary) -> dict:
    """The run's figures for machines (`--summary-json`)."""
    return {
        "total": summary.total, "completed": summary.completed, "failed": summary.failed,
        "skipped": summary.skipped, "not_run": summary.left, "prompt_tokens": summary.prompt_tokens,
        "generated_tokens": summary.generated_tokens, "seconds": summary.seconds,
        "generated_tokens_per_s": summary.generated_tokens / summary.seconds if summary.seconds else None,
        **{f"{name}_p{round(q * 100)}": quantile(values, q)
           for name, values in (("ttft_s", summary.ttft_s), ("tpot_s", summary.tpot_s)) for q in (0.5, 0.9, 0.99)},
        "warmup_s": summary.warmup_s, "warmup_shapes": summary.warmup_shapes,
        "steps_waiting_for_compiles": summary.compile_waits, "interrupted_by": summary.interrupted,
    }


def describe(summary: BatchSummary, output: str) -> str:
    """The run's closing lines for a person."""
    rate = summary.generated_tokens / summary.seconds if summary.seconds else 0.0
    lines = [f"{summary.completed} completed, {summary.failed} failed, {summary.skipped} already in {output}, "
             f"{summary.left} not run, of {summary.total}; {summary.generated_tokens} tokens generated in "
             f"{summary.seconds:.1f} s ({rate:.1f} tok/s)"]
    figures = summary_dict(summary)
    if summary.ttft_s:
        lines.append("time to first token (from the start of the run): "
                     + ", ".join(f"p{q} {figures[f'ttft_s_p{q}']:.2f} s" for q in (50, 90, 99)))
    if summary.tpot_s:
        lines.append("time per output token after the first: "
                     + ", ".join(f"p{q} {figures[f'tpot_s_p{q}'] * 1e3:.1f} ms" for q in (50, 90, 99)))
    if summary.warmup_shapes:
        lines.append(f"warm-up: {summary.warmup_s:.1f} s before the first step, {summary.warmup_shapes} step shapes "
                     f"foreseen; {summary.compile_waits} steps waited for a compile")
    elif summary.compile_waits:
        lines.append(f"{summary.compile_waits} steps waited for a compile (no warm-up)")
    if summary.interrupted and summary.left:
        lines.append(f"interrupted by {summary.interrupted}: {summary.left} requests not run; run the same "
                     "command again to resume (what is in the output is skipped)")
    return "\n".join(lines)


def report(summary: BatchSummary, output: str) -> None:
    print(describe(summary, output), file=sys.stderr)
