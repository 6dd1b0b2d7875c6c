"""Per-request and per-completion state, and the rules that end a completion."""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

from eaas_jax.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from eaas_jax.engine.sampling_params import SamplingParams
from eaas_jax.engine.tokenizer import Tokenizer


@dataclasses.dataclass(eq=False)
class Sequence:
    """One completion being generated: a prompt plus the tokens sampled so far."""

    request: "Request"
    index: int  # which of the request's n completions
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)
    cumulative_logprob: float = 0.0
    blocks: list[int] = dataclasses.field(default_factory=list)
    # Tokens sampled by dispatched steps but not yet appended (still on the device).
    num_pending: int = 0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # How often each token occurs in output_ids (the penalties' counts; kept
    # for penalized requests only).
    output_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # The request's, kept here: read for every row of every step.
    params: SamplingParams = dataclasses.field(init=False, repr=False)
    # sampling_row's fields that stay the same at every step.
    _fixed_sampling: dict = dataclasses.field(init=False, repr=False)
    _penalized: bool = dataclasses.field(init=False, repr=False)
    _prompt_len: int = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.params = p = self.request.params
        self._penalized = p.penalized
        self._prompt_len = len(self.request.prompt_ids)
        self._fixed_sampling = {"temperature": p.temperature, "top_p": p.top_p, "top_k": max(p.top_k, 0),
                                "min_p": p.min_p, "seed": self.request.seed, "stream": self.index}
        if self._penalized:
            self._fixed_sampling.update(presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                                        repetition_penalty=p.repetition_penalty)

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.request.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        """Prompt, sampled and pending tokens: the position of the next one."""
        return self._prompt_len + len(self.output_ids) + self.num_pending

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _output_limit(self, max_model_len: int) -> int:
        """The most tokens it may sample: max_tokens, and what the context leaves."""
        limit = max_model_len - self._prompt_len
        return limit if self.params.max_tokens is None else min(limit, self.params.max_tokens)

    def tokens_left(self, max_model_len: int) -> int:
        """Tokens it may still sample by its length limits, pending ones counted."""
        return self._output_limit(max_model_len) - len(self.output_ids) - self.num_pending

    def can_decode_window(self) -> bool:
        """Whether its next tokens need nothing of the host between them (a
        decode window): min_tokens reached, pending tokens counted (no banned
        ids; penalties count a window's tokens on the device)."""
        return len(self.output_ids) + self.num_pending >= self.params.min_tokens

    def ends_with_pending_token(self, max_model_len: int) -> bool:
        """Whether a pending token reaches the length limit: nothing to run after it."""
        return self.num_pending > 0 and self._at_length_limit(max_model_len, self.num_pending)

    def sampling_row(self, eos_ids: tuple[int, ...]) -> dict:
        p = self.params
        num_sampled = len(self.output_ids) + self.num_pending
        banned = []
        if num_sampled < p.min_tokens:
            banned = list(p.stop_token_ids)
            if not p.ignore_eos:
                banned.extend(eos_ids)
        row = dict(self._fixed_sampling)
        row["step"] = num_sampled
        row["banned"] = banned
        if self._penalized:
            # The tokens known here; a pending one is counted on the device.
            counts = self.output_counts
            row["penalized"] = [(t, counts.get(t, 0)) for t in self.request.prompt_token_set | counts.keys()]
        return row

    def append(
        self,
        token: int,
        logprob: float,
        rank: int,
        top: list[tuple[int, float]],
        tokenizer: Tokenizer,
        eos_ids: tuple[int, ...],
        max_model_len: int,
    ) -> None:
        """Records a sampled token and decides whether the completion has ended."""
        p = self.params
        self.output_ids.append(token)
        if self._penalized:
            self.output_counts[token] += 1
        self.cumulative_logprob += logprob
        if p.logprobs is not None:
            entry = {
                tid: Logprob(lp, rank + 1, tokenizer.token_text(tid))
                for rank, (tid, lp) in enumerate(top[: p.logprobs])
            }
            if token not in entry:
                entry[token] = Logprob(logprob, rank, tokenizer.token_text(token))
            self.logprobs.append(entry)

        can_stop = len(self.output_ids) >= p.min_tokens
        if can_stop and not p.ignore_eos and token in eos_ids:
            self.finish_reason = "stop"
        elif can_stop and token in p.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
        at_length_limit = self._at_length_limit(max_model_len)
        if p.stop or self.finished or at_length_limit:
            self.text = tokenizer.decode(self.output_ids, p.skip_special_tokens)
        if can_stop and p.stop and not self.finished:
            self._check_stop_strings()
        if not self.finished and at_length_limit:
            self.finish_reason = "length"

    def _at_length_limit(self, max_model_len: int, num_pending: int = 0) -> bool:
        return len(self.output_ids) + num_pending >= self._output_limit(max_model_len)

    def _check_stop_strings(self) -> None:
        found = [(self.text.find(s), s) for s in self.params.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return
        index, stop = min(found)
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self.text = self.text[:end]
        self.finish_reason, self.stop_reason = "stop", stop

    def completion(self, tokenizer: Tokenizer) -> CompletionOutput:
        # `text` is kept current only where stop strings need it; otherwise
        # decode on demand (once per completion for offline generation).
        current = self.finished or bool(self.params.stop)
        return CompletionOutput(
            index=self.index,
            text=self.text if current else tokenizer.decode(self.output_ids, self.params.skip_special_tokens),
            token_ids=list(self.output_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs if self.params.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    metrics: RequestMetrics = dataclasses.field(default_factory=lambda: RequestMetrics(time.time()))
    sequences: list[Sequence] = dataclasses.field(default_factory=list)
    error: str | None = None  # why the request failed (its completions end with finish_reason "error")
    # Per prompt token: None for the first, then {token id: Logprob} of it and
    # the most likely ones (SamplingParams.prompt_logprobs); set by the prefill.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def __post_init__(self):
        self.sequences = [Sequence(self, i) for i in range(self.params.n)]

    @functools.cached_property
    def prompt_token_set(self) -> frozenset[int]:
        return frozenset(self.prompt_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    def set_prompt_logprobs(self, result, row: int, tokenizer: Tokenizer) -> None:
        """Takes the prompt logprobs of a prefill step's `row` (a StepResult
        that scored its tokens; a prefill's row starts with the prompt)."""
        k = self.params.prompt_logprobs
        entries: list[dict[int, Logprob] | None] = [None]
        for t, token in enumerate(self.prompt_ids[1:]):
            entry = {int(tid): Logprob(float(lp), rank + 1, tokenizer.token_text(int(tid)))
                     for rank, (tid, lp) in enumerate(zip(result.prompt_top_ids[row, t, :k],
                                                          result.prompt_top_logprobs[row, t, :k]))}
            if token not in entry:
                entry[token] = Logprob(float(result.prompt_logprobs[row, t]), int(result.prompt_ranks[row, t]),
                                       tokenizer.token_text(token))
            entries.append(entry)
        self.prompt_logprobs = entries

    @property
    def finished(self) -> bool:
        for seq in self.sequences:  # (a loop: asked for every request of every step)
            if seq.finish_reason is None:
                return False
        return True

    def fail(self, error: str) -> list["Sequence"]:
        """Ends every completion not finished yet with `error`; returns those."""
        self.error = error
        ended = [seq for seq in self.sequences if not seq.finished]
        for seq in ended:
            seq.finish_reason = "error"
        return ended

    def output(self, tokenizer: Tokenizer) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_ids),
            prompt_logprobs=self.prompt_logprobs,
            outputs=[s.completion(tokenizer) for s in self.sequences],
            finished=self.finished,
            metrics=self.metrics,
            error=self.error,
        )
