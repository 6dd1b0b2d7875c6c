"""Greedy parity at speed for every supported architecture family: random
8-layer models at W1's widths in float32, this project's engine against
transformers' float32 `generate` on the same weights, on the same device.

    python bench/arch_parity.py [--architectures mixtral,qwen2_moe,...] [--tokens 32] [--batches 1,64]
                                [--append bench/RESULTS.md]
    python bench/arch_parity.py --tiny      # the same at the unit tests' sizes (a CPU check of the script)

Per architecture, in separate processes (each gets the whole device):
  hf    transformers builds the model from a seed on the device (norm
        weights and biases drawn too), saves it as a HF directory (under
        /dev/shm where it has room: 22 GB at W1 widths),
        and greedy-generates `tokens` tokens for `batch` prompts of
        PROMPT_LEN random tokens, recording each step's top-2 logit margin;
  eaas  this project's Engine loads that directory (its own importer) and
        generates the same, greedy.
A row counts, per prompt, the tokens before the first difference; where one
is under `tokens`, the margin of transformers' top two logits at that step
says whether it is a near-tie (float32 reduction order), not a bug; and so
does the routers' smallest top-k margin up to it (every layer, every
position the forwards up to that token computed: the k-th largest router
logit less the (k+1)-th, the gap a rounding difference must cross to send a
token to another expert, which changes the hidden state by far more than
rounding). That margin is exact for the softmax-of-logits routers (Mixtral,
Qwen2/3-MoE, OLMoE); DeepSeek's select by group and, in V3, by biased
sigmoids, so there it only approximates the selection's gap.
float32 matmuls run at full precision on both sides (torch's default; the
engine's for float32 weights, where JAX's GPU default would be TF32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile

from _results import REPO, finished_phases, git_commit, machine, publish, run_phase

PROMPT_LEN = 32
# W1's widths (bench/w1_decode_gpu.py, ../shared/BENCH.md): 2048 wide, 8 layers,
# 128 experts of 768, top-8, 32 query heads of 128.
_W1_COMMON = dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
_W1_MLA = dict(num_key_value_heads=32, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128, moe_intermediate_size=768, intermediate_size=6144, first_k_dense_replace=1,
               n_routed_experts=128, num_experts_per_tok=8, n_group=8, topk_group=4)
# What published DeepSeek checkpoints use (YaRN with mscale); the tiny tests' variants of it.
_W1_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
            "beta_slow": 1}
W1_ARCHITECTURES = {
    "mixtral": dict(num_local_experts=128, num_experts_per_tok=8, intermediate_size=768),
    "qwen2_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      shared_expert_intermediate_size=3072, intermediate_size=6144, norm_topk_prob=False,
                      mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
                      head_dim=128, norm_topk_prob=True, rope_theta=1e6, mlp_only_layers=[0]),
    # clip_qkv at 1: q, k and v are ~N(0, 0.9) here, so the clipping acts
    "olmoe": dict(num_experts=128, num_experts_per_tok=8, intermediate_size=768, clip_qkv=1.0),
    "deepseek_v2": dict(**_W1_MLA, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
                        routed_scaling_factor=1.5,
                        rope_scaling={**_W1_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "deepseek_v3": dict(**_W1_MLA, q_lora_rank=1536, n_shared_experts=1, routed_scaling_factor=2.5,
                        rope_scaling={**_W1_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def configs(tiny: bool) -> dict[str, dict]:
    """Each architecture's transformers config keywords: W1 widths, or the
    unit tests' tiny ones (tests/hf_models.py)."""
    if tiny:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        import hf_models

        return {name: {**hf_models._BASE, **extra} for name, extra in hf_models.ARCHITECTURES.items()}
    return {name: {**_W1_COMMON, **extra} for name, extra in W1_ARCHITECTURES.items()}


def prompts(batch: int, vocab_size: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(1)
    return [rng.integers(3, vocab_size, size=PROMPT_LEN).tolist() for _ in range(batch)]


def randomize_defaults(model) -> None:
    """Norm weights are 1 and biases 0 at init, so a model that ignored them
    (q/k norms, MLA's latent norms, Qwen2's qkv biases) would still agree:
    draw them at random, and DeepSeek-V3's score-correction bias (a buffer)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0, 0.1)


def scratch_directory(bytes_needed: int) -> str | None:
    """/dev/shm if it has room for the checkpoint (with a margin), else the
    default temporary directory."""
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 1.2 * bytes_needed:
        return "/dev/shm"
    return None


def phase_hf(architecture: str, directory: str, batches: list[int], tokens: int, tiny: bool) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    keywords = configs(tiny)[architecture]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(architecture, **keywords)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        randomize_defaults(model)
    model.save_pretrained(directory, max_shard_size="4GB")
    model.generation_config.eos_token_id = None
    # (machine: what the run's header names; a run composed later from --raw is this one's)
    result = {"params": sum(p.numel() for p in model.parameters()), "machine": machine()}
    for batch in batches:
        ids = torch.tensor(prompts(batch, keywords["vocab_size"]), device=device)
        with torch.no_grad(), RouterMargins(model, batch, config.num_experts_per_tok) as routers:
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=0, attention_mask=torch.ones_like(ids), output_scores=True,
                                 return_dict_in_generate=True)
        top2 = torch.stack(out.scores, 1).topk(2, dim=-1).values  # [batch, tokens, 2]
        result[f"b{batch}"] = {"tokens": out.sequences[:, PROMPT_LEN:].tolist(),
                               "margins": (top2[..., 0] - top2[..., 1]).tolist(),
                               "router_margins": routers.per_token(tokens)}
    return result


class RouterMargins:
    """Records, for each forward of a `generate` over `batch` rows (the
    prompt's, then one a token), each row's smallest router top-k margin
    over its positions and the model's MoE layers: the k-th largest router
    logit less the (k+1)-th. The routers are the modules named `*.gate`
    returning (router logits [tokens, experts], ...) (transformers 5's)."""

    def __init__(self, model, batch: int, top_k: int):
        self.model, self.batch, self.top_k = model, batch, top_k
        self.forwards: list = []  # per forward: [batch] smallest margin so far in it
        self._hooks = []

    def __enter__(self) -> "RouterMargins":
        self._hooks.append(self.model.register_forward_pre_hook(self._start_forward))
        for name, module in self.model.named_modules():
            if name.endswith(".gate"):
                self._hooks.append(module.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()

    def _start_forward(self, module, inputs) -> None:
        import torch

        self.forwards.append(torch.full((self.batch,), float("inf")))

    def _record(self, module, inputs, output) -> None:
        if not (isinstance(output, tuple) and output and output[0].dim() == 2):
            return  # (not a router)
        top = output[0].float().topk(self.top_k + 1, dim=-1).values
        margin = (top[:, -2] - top[:, -1]).reshape(self.batch, -1).min(dim=1).values.cpu()
        self.forwards[-1] = self.forwards[-1].minimum(margin)

    def per_token(self, tokens: int) -> list[list[float]]:
        """[batch, tokens]: the smallest margin in the forwards up to the
        one that scored each generated token (the prompt's for the first)."""
        import torch

        steps = torch.stack(self.forwards[:tokens], dim=1)  # [batch, tokens]
        return torch.cummin(steps, dim=1).values.tolist()


def phase_eaas(architecture: str, directory: str, batches: list[int], tokens: int, tiny: bool) -> dict:
    sys.path.insert(0, REPO)
    from eaas_jax.engine import Engine, SamplingParams

    vocab_size = configs(tiny)[architecture]["vocab_size"]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    with Engine(directory, dtype="float32", max_num_seqs=max(batches), max_model_len=PROMPT_LEN + tokens + 16,
                block_size=16) as engine:
        return {f"b{batch}": {"tokens": [o.outputs[0].token_ids for o in
                                         engine.generate(prompts(batch, vocab_size), params, use_tqdm=False)]}
                for batch in batches}


def _covers(phase: dict | None, batches: list[int], tokens: int) -> bool:
    """Whether a phase's kept result has `tokens` tokens for every prompt of
    every batch in `batches`."""
    return phase is not None and all(
        len(phase.get(f"b{batch}", {}).get("tokens", ())) == batch
        and all(len(row) == tokens for row in phase[f"b{batch}"]["tokens"]) for batch in batches)


#: A router top-k margin under this (~100 float32 ulps of a unit-scale logit)
#: is a near-tie that the two sides' reduction orders may decide either way: a
#: prompt whose transformers run meets one, at any token, is set apart before
#: the comparison (from transformers' margins alone, not from where the
#: tokens differ). Measured at f4f1d24: the one Qwen3-MoE prompt that differs
#: (at token 14) had met a margin of 2e-6 by then, the second smallest of
#: its 64 prompts; the smallest logit margin of the prompts clear of router
#: near-ties was 1.8e-4, and all of those agreed.
ROUTER_NEAR_TIE = 1e-5


def compare(ours: list[list[int]], theirs: list[list[int]], margins: list[list[float]],
            router_margins: list[list[float]] | None = None) -> dict:
    """Tokens equal before the first difference, per prompt; the smallest of
    them; transformers' top-2 margin at each first difference, and its
    routers' smallest top-k margin up to there (None where not recorded);
    how many prompts are clear of router near-ties (`ROUTER_NEAR_TIE`; None
    where not recorded) and how many of those have all tokens equal."""
    equal, at_divergence, routers_at_divergence = [], [], []
    for row, (a, b, m) in enumerate(zip(ours, theirs, margins)):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        equal.append(n)
        if n < len(b):
            at_divergence.append(m[n])
            routers_at_divergence.append(router_margins[row][n] if router_margins else None)
    clear = [min(r) >= ROUTER_NEAR_TIE for r in router_margins] if router_margins else None
    return {"min_equal": min(equal), "all_equal": sum(n == len(b) for n, b in zip(equal, theirs)),
            "margins_at_divergence": at_divergence, "router_margins_at_divergence": routers_at_divergence,
            "clear": None if clear is None else sum(clear),
            "clear_all_equal": None if clear is None else sum(
                c and n == len(b) for c, n, b in zip(clear, equal, theirs))}


def clear_cell(comparison: dict) -> str:
    """'equal/clear' of `compare`'s prompts clear of router near-ties ('?': not recorded)."""
    if comparison["clear"] is None:
        return "?"
    return f"{comparison['clear_all_equal']}/{comparison['clear']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--architectures", default=",".join(W1_ARCHITECTURES))
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="the unit tests' model sizes")
    parser.add_argument("--phase", choices=["hf", "eaas"], help=argparse.SUPPRESS)
    parser.add_argument("--architecture", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help="JSONL file to append each phase's raw numbers to")
    parser.add_argument("--resume", action="store_true",
                        help="take the architectures whose two phases --raw holds, at these batches and tokens, "
                             "from there (a run cut short: device calls are 10 minutes)")
    parser.add_argument("--append", help="results file to append the table to")
    parser.add_argument("--commit", help="commit to record (default: git HEAD; a copied tree may lack .git)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.phase:
        phase = phase_hf if args.phase == "hf" else phase_eaas
        print(json.dumps(phase(args.architecture, args.dir, batches, args.tokens, args.tiny)))
        return

    if args.resume and not args.raw:
        parser.error("--resume needs --raw")
    # A TERM (a device call's time running out) unwinds like an exception, so
    # that a checkpoint in /dev/shm (22 GB at W1 widths, in RAM) is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    scratch = scratch_directory(4 * 6_000_000_000 if not args.tiny else 0)  # float32, < 6B parameters
    done = finished_phases(args.raw) if args.resume else {}
    rows, machines = [], set()
    for architecture in args.architectures.split(","):
        if architecture not in W1_ARCHITECTURES:
            raise SystemExit(f"unknown architecture {architecture!r}; known: {', '.join(W1_ARCHITECTURES)}")
        names = f"{architecture}-hf", f"{architecture}-eaas"
        if all(_covers(done.get(name), batches, args.tokens) for name in names):
            theirs, ours = (done[name] for name in names)
            print(f"{architecture}: taken from {args.raw}", file=sys.stderr)
        else:  # (the eaas phase loads the hf phase's directory: both run again)
            directory = tempfile.mkdtemp(prefix=f"parity-{architecture}-", dir=scratch)
            try:
                common = [__file__, "--architecture", architecture, "--dir", directory, "--batches", args.batches,
                          "--tokens", str(args.tokens), *(["--tiny"] if args.tiny else [])]
                theirs = run_phase([*common, "--phase", "hf"], name=names[0], raw=args.raw)
                ours = run_phase([*common, "--phase", "eaas"], name=names[1], raw=args.raw)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        machines.add(theirs.get("machine") or machine())
        for batch in batches:
            t = theirs[f"b{batch}"]
            rows.append((architecture, theirs["params"], batch,
                         compare(ours[f"b{batch}"]["tokens"], t["tokens"], t["margins"], t.get("router_margins"))))
    lines = [
        f"### Greedy parity with transformers, float32, every architecture ({datetime.date.today()}, "
        f"commit {args.commit or git_commit()})",
        "",
        f"Device: {', '.join(sorted(machines))}; `python bench/arch_parity.py {' '.join(sys.argv[1:])}`; random "
        f"{'tiny (the unit tests’ sizes)' if args.tiny else 'W1-width 8-layer'} models, float32 on both sides, "
        f"prompts of {PROMPT_LEN} random tokens, {args.tokens} greedy tokens each.",
        "",
        "| architecture | parameters | batch | prompts with all tokens equal | fewest equal tokens | "
        "transformers' top-2 margin where they differ | its routers' smallest top-k margin up to there | "
        f"prompts clear of router near-ties (transformers' top-k margins all >= {ROUTER_NEAR_TIE:g}): "
        "all tokens equal |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {a} | {p / 1e9:.3g}B | {b} | {c['all_equal']}/{b} | {c['min_equal']}/{args.tokens} | "
          f"{', '.join(f'{m:.2g}' for m in sorted(c['margins_at_divergence'])[:5]) or '-'} | "
          f"{', '.join('?' if m is None else f'{m:.2g}' for m in c['router_margins_at_divergence'][:5]) or '-'} | "
          f"{clear_cell(c)} |"
          for a, p, b, c in rows),
        "",
    ]
    publish(lines, args.append)


if __name__ == "__main__":
    main()
