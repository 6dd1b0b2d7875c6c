"""`SamplingParams`: vLLM's names and meanings, validated on construction."""

from __future__ import annotations

import dataclasses

MAX_LOGPROBS = 20
#: Completions one request may ask for at most (OpenAI's limit too).
MAX_N = 128
#: Stop strings one request may give, and their length at most: each is
#: looked for in the text after every token.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
#: Stop token ids one request may give at most (each widens the steps' banned-id input).
MAX_STOP_TOKEN_IDS = 64
#: Temperatures below this are greedy (as vLLM's): float32 cannot divide by them.
MIN_TEMPERATURE = 1e-5
# What the sampler's float32 and int32 inputs hold.
_FLOAT32_MAX = 3.4028234663852886e38
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass
class SamplingParams:
    """How to sample one request's completions.

    n: completions per prompt. temperature: 0 means greedy. top_p: nucleus mass in
    (0, 1]. top_k: keep the k most likely tokens (0 or -1: all). min_p: drop tokens
    whose probability is below min_p times the most likely one's. max_tokens: cap
    on generated tokens (None: up to the context limit). min_tokens: EOS and
    stop_token_ids are suppressed until this many tokens are generated. stop:
    strings that end the completion (not included in the text unless
    include_stop_str_in_output). stop_token_ids: tokens that end it (kept in
    token_ids). ignore_eos: keep going past EOS. seed: per-request seed making the
    completion reproducible whatever else is in the batch. logprobs: return the
    log-probabilities of this many most likely tokens at each step (plus the
    sampled one). prompt_logprobs: return, for each prompt token after the
    first, its log-probability given the tokens before it and those of this
    many most likely tokens (the first prompt token has none).
    presence_penalty, frequency_penalty (in [-2, 2]): subtracted from the logit of
    every token the completion has generated, once (presence) or once per
    occurrence (frequency); > 0 favours new tokens. repetition_penalty (> 0):
    the logit of every token of the prompt or the completion is divided by it
    when positive, multiplied by it otherwise; > 1 discourages repeats. All
    three act before temperature and the filters; returned logprobs stay the
    model's raw ones (as vLLM's).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(self.stop is None or isinstance(self.stop, (list, tuple)),
               "stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)),
               "stop_token_ids", f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        _check(
            _is_number(self.temperature) and self.temperature >= 0,
            "temperature", f"temperature must be a finite number >= 0, got {self.temperature!r}",
        )
        _check(
            _is_number(self.top_p) and 0 < self.top_p <= 1,
            "top_p", f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _check(
            _is_int(self.top_k) and (0 <= self.top_k <= _INT32_MAX or self.top_k == -1),
            "top_k", f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}",
        )
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens", f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}",
        )
        _check(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens", f"min_tokens must be an integer >= 0, got {self.min_tokens!r}",
        )
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "max_tokens", f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
        )
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}",
        )
        _check(
            self.prompt_logprobs is None
            or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
            "prompt_logprobs",
            f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.prompt_logprobs!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, f"{name} must be in [-2, 2], got {value!r}")
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0
            and self.repetition_penalty != float("inf"),
            "repetition_penalty", f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}",
        )
        _check(
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**32),
            "seed", f"seed must be an integer in [0, 2**32) or None, got {self.seed!r}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}",
        )
        _check(
            len(self.stop) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_LENGTH for s in self.stop),
            "stop", f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters",
        )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}",
        )
        _check(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            "stop_token_ids", f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}",
        )
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether any of the three penalties is set (other than its neutral value)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A real number the sampler's float32 inputs can hold (not NaN, not
    infinite, not an integer too large for a float)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return abs(float(x)) <= _FLOAT32_MAX  # False for NaN and infinities
    except OverflowError:
        return False


class InvalidParam(ValueError):
    """A sampling parameter out of range; `field` is its SamplingParams name
    (the HTTP server names the request's field from it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidParam(field, message)
