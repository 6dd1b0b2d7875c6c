"""`generation_config.json`: a checkpoint's end-of-sequence ids and default sampling.

As in vLLM, the defaults apply to requests that come without sampling
parameters: temperature, top_p, top_k, min_p, repetition_penalty and
max_new_tokens are taken from the file when present; everything else keeps
`SamplingParams`' defaults. The command line's flags default to the same.
"""

from __future__ import annotations

import dataclasses
import json
import os

from eaas_jax.engine.sampling_params import SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "min_p": "min_p", "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...] = ()
    sampling: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "GenerationDefaults":
        path = os.path.join(os.fspath(directory), GENERATION_CONFIG_FILE)
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        eos = data.get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
            raise ValueError(f"{path}: eos_token_id must be an id or a list of ids, got {data['eos_token_id']!r}")
        sampling = {ours: data[hf] for hf, ours in _SAMPLING_FIELDS.items() if data.get(hf) is not None}
        try:
            SamplingParams(**sampling)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return cls(tuple(eos), sampling)

    def eos_token_ids_with(self, config, source) -> tuple[int, ...]:
        """The end-of-sequence ids of the model `config` and of this file
        together (generation_config.json often names more); ValueError for
        one outside the vocabulary of the model at `source`."""
        ids = tuple(dict.fromkeys(config.eos_token_ids + self.eos_token_ids))
        bad = [t for t in ids if t >= config.vocab_size]
        if bad:
            raise ValueError(f"eos token ids {bad} of {source} are outside the vocabulary")
        return ids

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.sampling)
