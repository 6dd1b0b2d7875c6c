"""Serving an imported HF directory: tokenizer files, chat template,
generation_config.json, conversion to this project's format, and expert
servers reading the HF shards. References: transformers' tokenizer and
`generate` on the same directory."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import hf_models
from eaas_jax.cli import main as cli
from eaas_jax.engine import Engine, SamplingParams
from eaas_jax.engine.chat_template import ChatTemplateError

ENGINE_ARGS = dict(max_num_seqs=4, max_model_len=96, dtype="float32", block_size=8)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "you are a long day"}, {"role": "user", "content": "what is the time"}],
    [{"role": "user", "content": "how many people know the water"}],
]
WORDS = (
    "system user assistant the a of to and in is it you that he was for on are with as his they be at "
    "one have this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find"
).split()


def _word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    assert tok.get_vocab_size() <= hf_models.VOCAB
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", chat_template=TEMPLATE
    )


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A Qwen3-MoE HF directory with a tokenizer, a chat template (in
    chat_template.jinja, as transformers writes it) and a generation config."""
    model = hf_models.build("qwen3_moe", seed=5)
    directory = hf_models.save(model, str(tmp_path_factory.mktemp("hf") / "chat"))
    tokenizer = _word_tokenizer()
    tokenizer.save_pretrained(directory)
    end, eot = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [end, eot], "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                   "max_new_tokens": 20, "do_sample": True}, f)
    return model, directory


@pytest.fixture(scope="module")
def chat_engine(chat_dir):
    return Engine(chat_dir[1], **ENGINE_ARGS)


def _reference_ids(directory, conversation) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("template_in", ["chat_template.jinja", "tokenizer_config.json"])
def test_chat_prompt_equals_transformers(chat_dir, template_in, tmp_path):
    directory = chat_dir[1]
    if template_in == "tokenizer_config.json":  # the older export: template inside the config
        directory = str(tmp_path / "old")
        shutil.copytree(chat_dir[1], directory)
        os.remove(os.path.join(directory, "chat_template.jinja"))
        path = os.path.join(directory, "tokenizer_config.json")
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump({**config, "chat_template": TEMPLATE}, f)
    from eaas_jax.engine.tokenizer import Tokenizer as OurTokenizer

    ours = OurTokenizer.from_directory(directory)
    for conversation in CONVERSATIONS:
        text = ours.apply_chat_template(conversation)
        assert ours.encode(text, add_special_tokens=False) == _reference_ids(directory, conversation)


def test_chat_greedy_equals_transformers_generate(chat_dir, chat_engine):
    model, directory = chat_dir
    outputs = chat_engine.chat(CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    model.generation_config.eos_token_id = list(chat_engine.eos_token_ids)
    for conversation, out in zip(CONVERSATIONS, outputs):
        ids = _reference_ids(directory, conversation)
        assert out.prompt_token_ids == ids
        assert out.prompt.startswith("<|endoftext|><|im_start|>") and out.prompt.endswith("assistant\n")
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()
    one = chat_engine.chat(CONVERSATIONS[1], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert one[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids


def test_repetition_penalty_greedy_equals_transformers_generate(chat_dir, chat_engine):
    """repetition_penalty as transformers applies it (prompt and output tokens,
    logits divided when positive, multiplied otherwise), through the engine's
    pipelined decode (the latest token is still on the device when the next
    step is queued)."""
    model, _ = chat_dir
    model.generation_config.eos_token_id = list(chat_engine.eos_token_ids)
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.8)
    outputs = chat_engine.generate(prompts, params, use_tqdm=False)
    plain = chat_engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] != [o.outputs[0].token_ids for o in plain]
    for ids, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                                 repetition_penalty=1.8)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()


def test_prompt_logprobs_equal_transformers(chat_dir, chat_engine):
    """prompt_logprobs: None for the first token, then each token's logprob
    given the ones before (and the top 2) as transformers' forward pass gives
    them; the completion is unchanged by asking."""
    model, _ = chat_dir
    prompt = [5, 6, 7, 9, 11, 5]
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2, n=2)
    out = chat_engine.generate([prompt], params, use_tqdm=False)[0]
    plain = chat_engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids and plain.prompt_logprobs is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t, entry in enumerate(out.prompt_logprobs[1:]):
        token, want = prompt[t + 1], ref[t]
        assert entry[token].logprob == pytest.approx(float(want[token]), abs=1e-4)
        assert entry[token].rank == 1 + int((want > want[token]).sum())
        best = [tid for tid, lp in entry.items() if lp.rank <= 2]
        assert sorted(best) == sorted(np.argsort(-want)[:2].tolist())


def test_generation_config_sets_defaults_and_eos(chat_engine):
    end, eot = (chat_engine.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("<|im_end|>", "<|endoftext|>"))
    assert set(chat_engine.eos_token_ids) >= {end, eot}
    defaults = chat_engine.default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_tokens) == (0.6, 0.9, 20, 20)
    out = chat_engine.generate([[5, 6, 7]], use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) <= 20
    assert out.finish_reason == "length" or out.token_ids[-1] in (end, eot)


def test_chat_input_errors(chat_engine, chat_dir, tmp_path):
    with pytest.raises(ValueError, match="conversation 0: message 1 must be a dict with a 'role'"):
        chat_engine.chat([{"role": "user", "content": "hi"}, {"content": "no role"}], use_tqdm=False)
    bad = str(tmp_path / "bad")
    shutil.copytree(chat_dir[1], bad)
    with open(os.path.join(bad, "chat_template.jinja"), "w") as f:
        f.write("{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}")
    engine = Engine(bad, **ENGINE_ARGS)
    with pytest.raises(ChatTemplateError, match="first message must be system"):
        engine.chat(CONVERSATIONS[1], use_tqdm=False)
    with open(os.path.join(bad, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Engine(bad, **ENGINE_ARGS).chat(CONVERSATIONS[1], use_tqdm=False)


def test_directory_without_tokenizer_takes_token_ids_only(tmp_path):
    directory = hf_models.save(hf_models.build("mixtral", seed=6), str(tmp_path / "bare"))
    engine = Engine(directory, **ENGINE_ARGS)
    assert engine.generate([[4, 5, 6]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    with pytest.raises(ValueError, match="needs a tokenizer.*lists of token ids"):
        engine.generate(["some text"], use_tqdm=False)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.chat(CONVERSATIONS[0], use_tqdm=False)


def test_convert_writes_a_checkpoint_that_serves_the_same(chat_dir, chat_engine, tmp_path, capsys):
    out = str(tmp_path / "converted")
    assert cli(["convert", "--from-hf", chat_dir[1], "--out", out, "--dtype", "float32"]) == 0
    assert {"config.json", "params", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= set(os.listdir(out))
    assert not any(f.endswith(".safetensors") for f in os.listdir(out))
    converted = Engine(out, **ENGINE_ARGS)
    assert converted.config == chat_engine.config
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    assert [o.outputs[0].token_ids for o in converted.chat(CONVERSATIONS, greedy, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in chat_engine.chat(CONVERSATIONS, greedy, use_tqdm=False)
    ]
    assert cli(["convert", "--from-hf", chat_dir[1], "--out", out]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli(["convert", "--from-hf", out, "--out", str(tmp_path / "again")]) == 2
    assert "not a HF model directory" in capsys.readouterr().err


def test_expert_servers_serve_a_hf_directory(chat_dir, chat_engine, tmp_path):
    """Two expert-server processes load their experts from the HF shards; greedy
    outputs equal the embedded engine's."""
    deployment = tmp_path / "hf.toml"
    deployment.write_text(
        f'name = "hf-{os.getpid()}"\ntimeout_ms = 20000\n'
        '[[servers]]\nname = "low"\nexperts = ["0-2"]\n[[servers]]\nname = "high"\nexperts = ["3-5"]\n'
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = hf_models.prompts()
    expected = [o.outputs[0].token_ids for o in chat_engine.generate(prompts, greedy, use_tqdm=False)]
    with Engine(chat_dir[1], deployment=str(deployment), **ENGINE_ARGS) as engine:
        got = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy, use_tqdm=False)]
    assert got == expected


def test_cli_sampling_defaults_are_the_checkpoints_generation_config(chat_dir, tmp_path):
    """Unset flags take what the Python API takes (generation_config.json:
    max_new_tokens 20 here, not SamplingParams' 16); a flag given wins."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": [5, 6, 7]}) + "\n" + json.dumps({"prompt": [8, 9], "max_tokens": 3}) + "\n")
    lengths = {}
    for flags in ((), ("--max-tokens", "5")):
        out = tmp_path / f"out{len(flags)}.jsonl"
        assert cli(["generate", "--model", chat_dir[1], "--input", str(inp), "--output", str(out), "--ignore-eos",
                    "--dtype", "float32", "--max-model-len", "64", *flags]) == 0
        lengths[flags] = [len(json.loads(line)["outputs"][0]["token_ids"]) for line in out.read_text().splitlines()]
    assert lengths == {(): [20, 3], ("--max-tokens", "5"): [5, 3]}


def test_cli_chat_prompt(chat_dir, capsys):
    cli(["generate", "--model", chat_dir[1], "--chat", "--prompt", "what is the time", "--temperature", "0",
         "--max-tokens", "8", "--dtype", "float32", "--max-model-len", "64"])
    printed = capsys.readouterr().out
    assert "what is the time" not in printed  # the reply alone, not prompt + reply
    engine = Engine(chat_dir[1], **ENGINE_ARGS)
    reply = engine.chat([{"role": "user", "content": "what is the time"}],
                        SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    assert printed == reply + "\n"
