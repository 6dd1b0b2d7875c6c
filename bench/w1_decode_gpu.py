"""W1 on one GPU: decode of the embedded engine against HF transformers (same
config, same weights, same run) and against the HBM roofline.

    python bench/w1_decode_gpu.py [--batches 1,16,64,256] [--steps 64] [--append bench/RESULTS.md]

W1 (`../shared/BENCH.md`): Qwen3-30B-A3B shapes with 8 layers, bfloat16, random
weights from a fixed seed; prompts of 128 random tokens, then decode. Phases run
in separate processes (each framework gets the whole GPU):
  make  transformers builds the model on the GPU and saves it as a HF directory;
  eaas  this project's Engine loads that directory (its own HF importer), then per
        batch: prefill, then `steps` engine steps timed one by one (host wall
        clock between `Engine.step()` returns; each return brings one decode
        step's tokens to the host, the next step already queued on the
        device); also the device copy bandwidth (one compiled loop of
        elementwise passes);
  hf    transformers `generate` greedy on the same directory; time per decode
        step = difference of two generation lengths / their token difference.
Roofline: bytes one decode step must move (non-expert weights once, the LM head,
the experts the batch's routing is expected to touch, uniform routing assumed,
and the KV cache read) over the measured copy bandwidth (read + write).
Greedy tokens of prompt 0 are compared between the two engines.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time

from _results import REPO, append_rows, finished_phases, git_commit, publish, run_phase as run_in_process
PROMPT_LEN = 128
W1 = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
    rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def prompts(batch: int, vocab_size: int = W1["vocab_size"]) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab_size, size=PROMPT_LEN).tolist() for _ in range(batch)]


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phase_make(directory: str) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("qwen3_moe", **W1)
    start = time.time()
    with torch.device(_torch_device()):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="4GB")
    write_word_tokenizer(directory, W1["vocab_size"])
    return {"params": sum(p.numel() for p in model.parameters()), "make_s": time.time() - start}


def write_word_tokenizer(directory: str, vocab_size: int) -> None:
    """A tokenizer.json whose token i is the word "w<i>": the random-weight
    checkpoint has no tokenizer of its own, and serving text (stream chunks,
    stop strings) needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


def _copy_bandwidth() -> float:
    """Bytes read + written per second by an elementwise pass over 2 GiB, timed
    over 20 passes inside one compiled loop."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.bfloat16)
    passes = 20
    # 1 - y: one read and one write per element and pass, nothing XLA can fold
    # (y * 1.0001 would be y * 1 in bfloat16).
    loop = jax.jit(lambda a: jax.lax.fori_loop(0, passes, lambda i, y: 1 - y, a))
    loop(x).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        loop(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes * passes / min(times)


def kernels() -> dict:
    """Which grouped matmul and decode attention this process's engine uses."""
    sys.path.insert(0, REPO)
    import jax

    from eaas_jax.kernels.grouped_matmul import _tokamax
    from eaas_jax.kernels.paged_attention import kernel_enabled

    tokamax = _tokamax()
    if jax.default_backend() == "cpu":
        matmul = "tiled batched matmul (CPU)"
    else:
        matmul = f"tokamax {tokamax.__version__}" if tokamax else "lax.ragged_dot"
    return {"grouped_matmul": matmul,
            "decode_attention": "Pallas paged kernel" if kernel_enabled() else "gathered blocks"}


DECODE_WINDOW_VARIABLE = "W1_DECODE_WINDOW"  # (this script's: the engine's decode_window in a variant's run)


def engine_options(max_batch: int, steps: int) -> dict:
    """The W1 benches' `Engine` options: bfloat16, room for `max_batch`
    prompts of PROMPT_LEN and `steps` tokens, each batch's prompts prefilled
    in few steps."""
    return dict(dtype="bfloat16", max_num_seqs=max_batch, max_model_len=PROMPT_LEN + steps + 16, block_size=16,
                max_num_batched_tokens=8192,
                decode_window=int(os.environ[DECODE_WINDOW_VARIABLE]) if DECODE_WINDOW_VARIABLE in os.environ else None)


def phase_eaas(directory: str, batches: list[int], steps: int, profile_batches: list[int] = (),
               profile_top: int = 12, hlo_dir: str | None = None) -> dict:
    sys.path.insert(0, REPO)
    import jax

    from eaas_jax.engine import Engine

    # (what the run's header names, kept with its phase: a run composed later from --raw is this one's)
    result = {"bandwidth": _copy_bandwidth(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "params": _stored_params(directory), **kernels()}
    start = time.time()
    engine = Engine(directory, **engine_options(max(batches), steps))
    result["load_s"] = time.time() - start
    for batch in batches:
        result[f"b{batch}"] = {**time_decode(engine, batch, steps), "step_memory": decode_step_memory(engine, batch)}
    result["memory"] = memory_facts(engine)
    result["profiles"] = [profile_decode(engine, batch, steps, profile_top, hlo_dir) for batch in profile_batches]
    result["host_profiles"] = [host_profile(engine, batch, steps) for batch in profile_batches]
    return result


def decode_step_memory(engine, batch: int) -> dict | None:
    """The device memory of the costliest decode program compiled for
    `batch` rows (XLA's accounting: runner.StepMemory); None where the
    backend gives none."""
    decode = [m for m in map(engine.runner.step_memory.get, decode_shapes(engine, batch)) if m]
    if not decode:
        return None
    costliest = max(decode, key=lambda m: m.peak)
    return {**costliest._asdict(), "peak": costliest.peak}


def memory_facts(engine) -> dict:
    """What the largest batch that fits is computed from: the allocator's
    limit (JAX's default: 75% of the device's memory), the KV cache as
    allocated, and its bytes per token."""
    import jax

    from eaas_jax.model.attention import kv_cache_bytes_per_token

    stats = jax.local_devices()[0].memory_stats() or {}  # none on CPU
    return {"bytes_limit": stats.get("bytes_limit"),
            "kv_cache_bytes": sum(x.nbytes for x in jax.tree.leaves(engine.runner.kv_cache)),
            "kv_bytes_per_token": kv_cache_bytes_per_token(engine.config, engine.dtype.itemsize)}


PROFILED_STEPS = 8


def start_decoding(engine, batch: int, steps: int) -> None:
    """`batch` W1 prompts of `steps` greedy tokens each, prefilled, and their
    first decode steps run (their shapes compiled): what a profile observes next."""
    from eaas_jax.engine import SamplingParams

    prefill(engine, batch, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True))
    for _ in range(2):
        engine.step_finished()


def profile_decode(engine, batch: int, steps: int, top: int = 12, hlo_dir: str | None = None) -> dict:
    """Where one decode step's device time goes at `batch`: a JAX profiler
    trace of PROFILED_STEPS decode steps (after `time_decode` compiled their
    shapes), its `top` device kernels summed by name per step. With
    `hlo_dir`, each profiled program's optimized HLO is written there too
    (what each kernel's fusion holds: to plan fusions off the device)."""
    import tempfile

    import jax

    start_decoding(engine, batch, steps)
    # Each step() queues the next step before it returns the last one's
    # tokens: the pauses let the step queued before the trace end before it
    # and the last one queued in it end in it, so it holds PROFILED_STEPS.
    time.sleep(0.2)
    with tempfile.TemporaryDirectory(prefix="w1-profile-") as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(PROFILED_STEPS):
                engine.step_finished()
            time.sleep(0.2)
        # (with decode windows each call decodes a window: per token step, as time_decode)
        summary = device_kernel_times(log_dir, PROFILED_STEPS * engine.scheduler.decode_window, top)
    while engine.has_unfinished_requests():
        engine.step_finished()
    try:  # a help to read the profile: its failure costs the column, not the phase's timings
        origins = collections.defaultdict(set)  # a kernel name's origins in each program that has it
        for i, shape in enumerate(decode_shapes(engine, batch)):
            hlo = engine.runner.optimized_hlo(shape)
            if hlo_dir:
                os.makedirs(hlo_dir, exist_ok=True)
                with open(os.path.join(hlo_dir, f"decode-b{batch}-{i}.hlo.txt"), "w") as f:
                    f.write(hlo)
            for name, origin in fusion_origins(hlo).items():
                origins[name].add(origin)
        for kernel in summary["top"]:
            kernel["origin"] = " or ".join(sorted(origins.get(kernel["name"], ())))
    except Exception as e:  # noqa: BLE001 - e.g. an HLO text this parser does not know
        print(f"the profiled kernels' source lines are left out: {e!r}", file=sys.stderr)
    return {"batch": batch, **summary}


def host_profile(engine, batch: int, steps: int, top: int = 15) -> dict:
    """Where the host's time a decode step goes at `batch`: Python's
    profiler over `steps` decode steps, functions by their own time (a call
    into JAX's C++ that waits, e.g. a dispatch blocked on the device, counts
    in its Python caller's own time)."""
    import cProfile
    import pstats

    start_decoding(engine, batch, steps)
    profiler, generated, start = cProfile.Profile(), engine.metrics.generated_tokens, time.perf_counter()
    profiler.enable()
    while engine.has_unfinished_requests():
        engine.step_finished()
    profiler.disable()
    seconds = time.perf_counter() - start
    done = max((engine.metrics.generated_tokens - generated) / batch, 1)  # token steps (a window's count each)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return {"batch": batch, "steps": done, "ms_per_step": seconds / done * 1e3,
            "top": [{"function": f"{os.path.basename(file)}:{line} {name}" if line else name,
                     "own_us_per_step": own / done * 1e6, "calls_per_step": calls / done}
                    for (file, line, name), (_, calls, own, _, _) in ranked]}


def host_profile_lines(label: str, profile: dict) -> list[str]:
    """A `host_profile` as a RESULTS paragraph and table."""
    return [f"{label}, the host's time at batch {profile['batch']} under Python's profiler: "
            f"{profile['ms_per_step']:.2f} ms a step over {profile['steps']:.0f} steps (the profiler's own cost "
            "included); functions by their own time (a C++ call that waits counts in its caller's):", "",
            "| function | own µs per step | calls per step |", "|---|---|---|",
            *(f"| `{row['function']}` | {row['own_us_per_step']:.1f} | {row['calls_per_step']:.1f} |"
              for row in profile["top"])]


def decode_shapes(engine, batch: int) -> list:
    """The greedy decode programs compiled for `batch` rows (runner.StepShape)."""
    from eaas_jax.engine.runner import bucket

    return [shape for shape in list(engine.runner.step_memory)  # (a background compile may add one)
            if shape.seq == 1 and shape.batch == bucket(batch) and shape.greedy]


def fusion_origins(hlo: str) -> dict[str, str]:
    """Kernel name -> the source line its fusion came from ("file.py:line
    function", the innermost frame, and the innermost in eaas_jax/ when that
    one is in a library), read off a compiled program's HLO text. A GPU
    kernel is named after its fusion with '.' and '-' as '_'; custom calls
    (Pallas kernels) are named by their own code and are not here."""
    import re

    def table(name: str) -> dict[int, str]:
        found = re.search(rf"^{name}\n((?:\d+ .*\n)+)", hlo, re.M)
        return dict((int(i), rest) for i, rest in (line.split(" ", 1) for line in found.group(1).splitlines())) \
            if found else {}

    def fields(text: str) -> dict[str, int]:
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}

    files = {i: v.strip('"') for i, v in table("FileNames").items()}
    functions = {i: v.strip('"') for i, v in table("FunctionNames").items()}
    locations = {i: fields(v) for i, v in table("FileLocations").items()}
    frames = {i: fields(v) for i, v in table("StackFrames").items()}

    def where(path: str, line: int, function: str = "") -> str:
        return f"{os.path.basename(path)}:{line} {function}".strip()

    def frame_origin(frame: int) -> str:
        chain, seen = [], set()
        while frame in frames and frame not in seen:  # innermost first
            seen.add(frame)
            loc = locations[frames[frame]["file_location_id"]]
            chain.append((files[loc["file_name_id"]], loc["line"], functions[loc["function_name_id"]]))
            # printed one past its parent's id (read off programs of this
            # repo: a frame's parent is then its caller's line); 0: none
            frame = frames[frame]["parent_frame_id"] - 1
        ours = next((c for c in chain if "eaas_jax" in c[0]), None)
        names = [where(*chain[0])] if chain else []
        return " < ".join(names + ([where(*ours)] if ours and ours != chain[0] else []))

    origins = {}
    for line in hlo.splitlines():
        found = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = .*\bfusion\(.*metadata=\{([^}]*)\}", line)
        if not found:
            continue
        metadata = found.group(2)
        frame = re.search(r"stack_frame_id=(\d+)", metadata)
        source = re.search(r'source_file="([^"]*)" source_line=(\d+)', metadata)  # older HLO text
        origin = frame_origin(int(frame.group(1))) if frame else where(source.group(1), int(source.group(2))) \
            if source else ""
        if origin:
            origins[re.sub(r"[.\-]", "_", found.group(1))] = origin
    return origins


#: Bounds (µs) the idle gaps between kernels are summed under (`device_kernel_times`).
GAP_BOUNDS_US = (10, 100)


def device_kernel_times(log_dir: str, steps: int, top: int = 12) -> dict:
    """Per-step device time by kernel name from the perfetto trace under
    `log_dir`: complete events ("X") on the CUDA stream lines ("Stream #...",
    streams of copies alone left out) of processes named after a GPU. (The same process's "XLA Ops" and "XLA
    Modules" lines repeat the kernels' time per op and per program, where a
    backend writes them; JAX 0.11's GPU traces have neither.) Also the idle
    time between one kernel's end and the next one's start on those streams
    (all GPUs' as one timeline: W1 runs on one), by length (GAP_BOUNDS_US),
    per step: launch gaps inside a program are microseconds, the device
    waiting for the host to queue the next step is longer (a heuristic:
    copies and a loop's predicate also leave the streams idle). `steps`
    steps have steps - 1 gaps between them: the long gaps a step are
    understated by 1 / steps."""
    import glob
    import gzip

    (path,) = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in processes.items() if "GPU" in name}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in device}
    # (a stream that ran kernels and copies is "Stream #14(Compute,MemcpyD2D)": its kernels count)
    streams = {key for key, name in threads.items()
               if name.startswith("Stream") and ("Compute" in name or "Memcpy" not in name)}
    by_name: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    spans = []
    for e in events:
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams:
            by_name[e["name"]] += e.get("dur", 0)
            count[e["name"]] += 1
            spans.append((e["ts"], e["ts"] + e.get("dur", 0)))
    gaps = collections.Counter()  # idle µs by the bound of GAP_BOUNDS_US it is under (None: longer)
    busy_until = None
    for start, end in sorted(spans):
        if busy_until is not None and start > busy_until:
            gap = start - busy_until
            gaps[next((b for b in GAP_BOUNDS_US if gap < b), None)] += gap
        busy_until = end if busy_until is None else max(busy_until, end)
    return {"device_processes": sorted(processes[p] for p in device),
            "device_lines": sorted(set(threads.values())),
            "device_us_per_step": sum(by_name.values()) / steps, "kernels_per_step": sum(count.values()) / steps,
            "gaps_us_per_step": {f"{low}-{high} µs": gaps[high] / steps
                                 for low, high in zip((0,) + GAP_BOUNDS_US, GAP_BOUNDS_US)}
            | {f"{GAP_BOUNDS_US[-1]} µs or more": gaps[None] / steps},
            "top": [{"name": name[:120], "us_per_step": us / steps, "calls_per_step": count[name] / steps}
                    for name, us in by_name.most_common(top)]}


def prefill(engine, batch: int, params) -> list[str]:
    """Adds `batch` W1 prompts to `engine` and steps until each has its
    first token (one prefill step or several: the token budget; the first
    of a shape compiles); their request ids."""
    ids = [engine.add_request(p, params) for p in prompts(batch, engine.config.vocab_size)]
    prefilled: set[str] = set()
    while len(prefilled) < batch:
        prefilled.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    return ids


def time_decode(engine, batch: int, steps: int) -> dict:
    """Prefill `batch` W1 prompts, then time `steps` greedy decode steps of
    `engine` one by one; steps that compiled a new program are left out.
    `host_busy`: a step's time less its wait for the device's results. An
    engine call that collects a decode window's tokens counts as that many
    steps (its time divided among them)."""
    import jax

    from eaas_jax.engine import SamplingParams

    ids = prefill(engine, batch, SamplingParams(temperature=0.0, max_tokens=steps + 3, ignore_eos=True))
    outputs: dict[str, list[int]] = {}
    engine.step()
    engine.step()  # decode shapes compiled
    times, busy, compiling = [], [], 0
    waits = []  # seconds each fetch of a step's results waited for the device
    fetch = engine.runner.fetch

    def timed_fetch(step):
        start = time.perf_counter()
        jax.block_until_ready(step.next_tokens)  # (an output of the step's program: its end)
        waits.append(time.perf_counter() - start)
        return fetch(step)

    engine.runner.fetch = timed_fetch
    try:
        while engine.has_unfinished_requests():
            compiled, waited, generated = engine.num_compilations, len(waits), engine.metrics.generated_tokens
            t0 = time.perf_counter()
            for out in engine.step_finished():  # no detokenizing of running requests: the peers do none
                outputs[out.request_id] = out.outputs[0].token_ids
            seconds = time.perf_counter() - t0
            per_row = (engine.metrics.generated_tokens - generated) / batch  # (1 a call without windows)
            if engine.num_compilations == compiled and per_row >= 1:
                times.append(seconds / per_row)
                busy.append((seconds - sum(waits[waited:])) / per_row)
            elif engine.num_compilations != compiled:
                compiling += 1
    finally:
        del engine.runner.fetch  # (the instance's attribute: the class's method again)
    times, busy = times[:-1], busy[:-1]  # the last step only collects
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "host_busy": statistics.median(busy), "compiling_steps": compiling, "tokens0": outputs[ids[0]][:32]}


def host_ms(timing: dict) -> str:
    """The host's median busy time a step in ms, of a `time_decode` result
    ('-' for one recorded before it was measured)."""
    return f"{timing['host_busy'] * 1e3:.2f}" if "host_busy" in timing else "-"


def step_ms(timing: dict) -> str:
    """'median (min-max)' in ms of a `time_decode` result."""
    return f"{timing['median'] * 1e3:.2f} ({timing['min'] * 1e3:.2f}-{timing['max'] * 1e3:.2f})"


def equal_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b)))


def tokens_equal(a: list[int], b: list[int]) -> str:
    """'n/m': n leading tokens equal of the m both generations have (a phase
    with fewer steps records fewer than 32)."""
    return f"{equal_prefix(a, b)}/{min(len(a), len(b))}"


def agreement(a: list[int], b: list[int], margins: list[float] | None) -> str:
    """`tokens_equal`, and where they differ transformers' top-2 logit margin
    there (small: a near-tie that bfloat16 rounding decides)."""
    n = equal_prefix(a, b)
    return tokens_equal(a, b) + (f" (margin {margins[n]:.3f})" if margins and n < min(len(a), len(b)) else "")


def phase_hf(directory: str, batches: list[int]) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(_torch_device())
    model.generation_config.eos_token_id = None
    result = {"torch": torch.__version__}

    def generate(batch, new_tokens):
        ids = torch.tensor(prompts(batch), device=_torch_device())
        _sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0,
                                 attention_mask=torch.ones_like(ids))
        _sync()
        return time.perf_counter() - start, out

    short, long_ = 8, 40
    for batch in batches:
        generate(batch, 2)  # warm-up
        t_short, _ = generate(batch, short)
        t_long, out = generate(batch, long_)
        result[f"b{batch}"] = {"step": (t_long - t_short) / (long_ - short),
                              "tokens0": out[0, PROMPT_LEN:PROMPT_LEN + 32].tolist()}
    # Where another engine's greedy tokens differ from these, how near-tied
    # the top two were: prompt 0's raw logits (its tokens are the same alone
    # as in any batch, up to rounding).
    ids = torch.tensor(prompts(1), device=_torch_device())
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(ids), output_logits=True, return_dict_in_generate=True)
    top2 = torch.stack(out.logits)[:, 0].float().topk(2).values
    result["margins0"] = (top2[:, 0] - top2[:, 1]).tolist()
    return result


def roofline_bytes(batch: int, steps: int) -> float:
    """Bytes one W1 decode step must read (bf16), uniform routing assumed."""
    d, L, E, k, f = W1["hidden_size"], W1["num_hidden_layers"], W1["num_experts"], W1["num_experts_per_tok"], W1["moe_intermediate_size"]
    h, kv, hd, V = W1["num_attention_heads"], W1["num_key_value_heads"], W1["head_dim"], W1["vocab_size"]
    attention = d * (h + 2 * kv) * hd + h * hd * d + 2 * hd + 2 * d  # q, k, v, o, q/k norms, layer norms
    router = d * E
    touched = E * (1 - (1 - k / E) ** batch)
    experts = touched * 3 * d * f
    kv_read = batch * (PROMPT_LEN + steps / 2) * 2 * kv * hd
    per_layer = attention + router + experts + kv_read
    return 2 * (L * per_layer + V * d + batch * d + d)  # + LM head, embedding rows, final norm


def _stored_params(directory: str) -> float:
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        return json.load(f)["metadata"]["total_size"] / 2  # bfloat16


def phase_jax_peer(directory: str, batches: list[int], steps: int, peer_dir: str) -> dict:
    """jax-llm-examples' Qwen3 on the same directory and prompts (bench/jax_peer.py)."""
    from jax_peer import Peer, peer_commit

    peer = Peer(peer_dir, directory, max_seq_len=PROMPT_LEN + steps + 8)
    result = {"commit": peer_commit(peer_dir)}
    for batch in batches:
        result[f"b{batch}"] = peer.time_decode(prompts(batch, peer.cfg.vocab_size), steps)
    return result


#: W2 (../shared/BENCH.md): W1 with all 48 of Qwen3-30B-A3B's layers.
W2_LAYERS = 48
#: Contexts (tokens a sequence holds) the largest batch is computed for.
FIT_CONTEXTS = (1024, 4096)


def memory_lines(ours: dict, batches: list[int]) -> list[str]:
    """Each batch's decode program's device memory, and the largest batch of
    W1 and W2 whose weights, KV cache and decode step fit under the
    allocator's limit. The step's own bytes (scratch, new outputs) grow
    linearly in rows: the line through the two largest batches. W2 repeats
    W1's layers: its weights and KV bytes per token scale with the layer
    count; its step's own bytes are taken as W1's (layers run one after
    another and reuse their temporaries)."""
    sys.path.insert(0, REPO)
    from eaas_jax.engine.runner import bucket

    facts = ours["memory"]
    memory = {b: ours[f"b{b}"]["step_memory"] for b in batches}
    if None in memory.values():
        return ["", "Decode step device memory: not reported by this backend."]
    own = {b: m["new_outputs"] + m["scratch"] for b, m in memory.items()}
    weights = memory[batches[-1]]["arguments"] - facts["kv_cache_bytes"]  # with the step's few inputs
    lines = ["", "Decode step device memory (XLA's accounting; the engine's KV cache, "
             f"{facts['kv_cache_bytes'] / 2**30:.2f} GiB, is allocated once for {max(batches)} sequences):", "",
             "| batch | step peak GiB (weights, KV cache, new outputs, scratch) | scratch + new outputs MiB |",
             "|---|---|---|",
             *(f"| {b} | {(memory[b]['arguments'] + own[b]) / 2**30:.2f} | {own[b] / 2**20:.0f} |" for b in batches)]
    if len(batches) < 2 or not facts["bytes_limit"]:
        return lines
    b1, b2 = sorted(batches)[-2:]
    rows1, rows2 = bucket(b1), bucket(b2)  # what the programs were compiled for
    if rows1 == rows2:
        return lines
    per_row = (own[b2] - own[b1]) / (rows2 - rows1)
    fixed = own[b2] - per_row * rows2
    d, V = W1["hidden_size"], W1["vocab_size"]
    outside_layers = 2 * (2 * V * d + d)  # embedding, LM head, final norm (bfloat16)
    limit = facts["bytes_limit"]
    lines += ["", f"Largest batch whose weights, KV cache and decode step fit in {limit / 2**30:.1f} GiB (JAX's "
              f"allocator limit on this device), computed from the measured step memory ({per_row / 2**10:.0f} KiB "
              f"a row beyond weights and KV cache, through batches {b1} and {b2}):", "",
              "| model | weights GiB | KV KiB per token | "
              + " | ".join(f"largest batch at {c} tokens" for c in FIT_CONTEXTS) + " |",
              "|---|---|---|" + "---|" * len(FIT_CONTEXTS)]
    for name, layers in (("W1", W1["num_hidden_layers"]), ("W2", W2_LAYERS)):
        scale = layers / W1["num_hidden_layers"]
        w = outside_layers + (weights - outside_layers) * scale
        per_token = facts["kv_bytes_per_token"] * scale
        fits = [max(0, int((limit - w - fixed) // (c * per_token + per_row))) for c in FIT_CONTEXTS]
        lines.append(f"| {name} ({layers} layers) | {w / 2**30:.1f} | {per_token / 2**10:.0f} | "
                     + " | ".join(map(str, fits)) + " |")
    return lines


def profile_lines(label: str, profile: dict) -> list[str]:
    """A `profile_decode` result as a table of its costliest kernels."""
    return [
        f"{label}, one decode step at batch {profile['batch']}: {profile['device_us_per_step']:.0f} µs of kernels "
        f"({profile['kernels_per_step']:.0f} kernels on {', '.join(profile['device_processes'])}'s streams)"
        + ("; the device idle between kernels, µs a step: "
           + ", ".join(f"{v:.0f} in gaps {k}" for k, v in profile["gaps_us_per_step"].items()) + " (short gaps: "
           "mostly kernel launches inside the step's program; long ones: mostly the device waiting for the host)."
           if "gaps_us_per_step" in profile else "."),
        "",
        "| kernel | µs per step | calls per step | from (the fusion's source line) |",
        "|---|---|---|---|",
        *(f"| `{k['name']}` | {k['us_per_step']:.1f} | {k['calls_per_step']:.0f} | "
          + (f"`{k['origin']}` |" if k.get("origin") else " |") for k in profile["top"]),
    ]


def run_phase(args, phase: str, env: dict | None = None, name: str | None = None) -> dict:
    """`phase` in a process of its own; with --resume, what --raw holds of it
    if that covers this run's batches."""
    done = finished_phases(args.raw).get(name or phase) if args.resume else None
    if done and phase != "make" and all(f"b{b}" in done for b in args.batches.split(",")):
        return done
    if phase != "make" and not os.path.exists(os.path.join(args.dir, "config.json")):
        run_phase(args, "make")
    profile = ["--profile-batches", args.profile_batches, "--profile-top", str(args.profile_top)] \
        + (["--hlo-dir", os.path.join(args.hlo_dir, name or phase)] if args.hlo_dir else []) \
        if args.profile_batches and phase == "eaas" else []
    peer = ["--jax-peer", args.jax_peer] if phase == "jax" else []
    return run_in_process(
        [__file__, "--phase", phase, "--dir", args.dir, "--batches", args.batches, "--steps", str(args.steps),
         *profile, *peer],
        name=name or phase, raw=args.raw, env=env,
    )


#: --compare-FLAG (any number of them): the engine timed again in the same run with
#: one setting changed, each a group of columns: FLAG -> (its columns' label, the
#: environment it runs in, its phase's name).
VARIANTS = {
    "gather": ("gathered-blocks attention", {"EAAS_JAX_PAGED_ATTENTION": "gather"}, "eaas-gather"),
    "experts-paths": ("grouped routed experts only", {"EAAS_JAX_GATHERED_EXPERTS": "off"}, "eaas-grouped-experts"),
    "one-row-dot": ("single rows not padded to a GEMM", {"EAAS_JAX_ONE_ROW_GEMM": "off"}, "eaas-one-row-dot"),
    "one-token-steps": ("one-token steps (decode_window=1)", {DECODE_WINDOW_VARIABLE: "1"}, "eaas-one-token-steps"),
    "cache-write-xla": ("the KV cache written by XLA's scatters", {"EAAS_JAX_CACHE_WRITE": "xla"},
                        "eaas-cache-write-xla"),
    "router-xla": ("the router's softmax and top k by XLA", {"EAAS_JAX_ROUTER": "xla"}, "eaas-router-xla"),
    "decode-prologue": ("norms, rotation and cache write by the decode prologue kernel",
                        {"EAAS_JAX_DECODE_PROLOGUE": "kernel"}, "eaas-decode-prologue"),
    # XLA launches a decode window's loop body kernel by kernel from the host
    # (~1.4 ms of a window's host time at batch 1 on an H100, commit 07d3021);
    # with WHILE (and CONDITIONAL) among its command buffers' types, the loop
    # is one CUDA graph, replayed
    "command-buffers": ("the decode window's loop captured as a CUDA graph",
                        {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL "
                                      "--xla_gpu_graph_min_graph_size=1"}, "eaas-command-buffers"),
}


def variant_environment(flag: str) -> dict:
    """The environment a variant's phase runs in: this one with the variant's
    settings (its XLA_FLAGS after any this one has)."""
    env = dict(os.environ)
    for key, value in VARIANTS[flag][1].items():
        env[key] = f"{env[key]} {value}" if key == "XLA_FLAGS" and env.get(key) else value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--dir", default="/tmp/w1-qwen3-moe-8l")
    parser.add_argument("--phase", choices=["make", "eaas", "hf", "jax"])
    parser.add_argument("--append", help="results file to append the table to")
    parser.add_argument("--raw", help="JSONL file to append each phase's raw numbers to")
    parser.add_argument("--resume", action="store_true", help="take the phases --raw already holds from there")
    parser.add_argument("--commit", help="commit to record (default: git HEAD; a copied tree may lack .git)")
    for flag, (label, env, _) in VARIANTS.items():
        parser.add_argument(f"--compare-{flag}", action="store_true",
                            help=f"also time the engine with {label} ({' '.join(f'{k}={v}' for k, v in env.items())}), "
                                 "in the same run")
    parser.add_argument("--profile-batches", default="",
                        help="also profile decode steps at these batches (comma-separated): device time by kernel")
    parser.add_argument("--profile-top", type=int, default=12, help="kernels a profile lists (the costliest)")
    parser.add_argument("--hlo-dir", help="also write each profiled decode program's optimized HLO text under "
                                          "DIR/PHASE (what the profile's kernels hold)")
    parser.add_argument("--jax-peer", metavar="DIR",
                        help="also time jax-llm-examples' Qwen3 (the qwen3 directory of a checkout): bench/jax_peer.py")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    profile_batches = [int(b) for b in args.profile_batches.split(",") if b]
    if not set(profile_batches) <= set(batches):
        parser.error("--profile-batches must be among --batches (shapes compiled before the trace)")
    compared = [flag for flag in VARIANTS if getattr(args, f"compare_{flag.replace('-', '_')}")]
    if args.phase == "make":
        print(json.dumps(phase_make(args.dir)))
        return
    if args.phase == "eaas":
        print(json.dumps(phase_eaas(args.dir, batches, args.steps, profile_batches, args.profile_top, args.hlo_dir)))
        return
    if args.phase == "hf":
        print(json.dumps(phase_hf(args.dir, batches)))
        return
    if args.phase == "jax":
        print(json.dumps(phase_jax_peer(args.dir, batches, args.steps, args.jax_peer)))
        return

    ours = run_phase(args, "eaas")  # the defaults; a variant changes one setting
    variants = []  # (column label, that run's result): the engine again with one setting changed
    for flag in compared:
        try:
            variants.append((VARIANTS[flag][0], run_phase(args, "eaas", env=variant_environment(flag),
                                                          name=VARIANTS[flag][2])))
        except SystemExit as e:  # (an experiment's failure costs its columns only, as the peer's does)
            print(f"the variant --compare-{flag} failed ({e}); its columns are left out", file=sys.stderr)
    peer = run_phase(args, "hf")
    jax_peer = None
    if args.jax_peer:
        try:
            jax_peer = run_phase(args, "jax")
        except SystemExit as e:  # the peer is another project's code: its failure costs its column only
            print(f"the JAX peer failed ({e}); its column is left out", file=sys.stderr)
    import jax
    import torch

    # (the device the engine ran on: a run composed later from --raw records that one)
    device = ours.get("device") or (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                                    else platform.processor() or "CPU")
    commit = args.commit or git_commit()
    bandwidth = ours["bandwidth"]
    flags = "".join(f" --compare-{flag}" for flag in compared) \
        + (f" --profile-batches {args.profile_batches} --profile-top {args.profile_top}" if args.profile_batches else "") \
        + (" --jax-peer DIR" if jax_peer else "")
    lines = [
        f"### W1 decode, embedded engine vs transformers vs HBM roofline ({datetime.date.today()}, commit {commit})",
        "",
        f"Device: {device}; JAX {ours.get('jax', jax.__version__)}, torch {peer.get('torch', torch.__version__)}; "
        f"`python bench/w1_decode_gpu.py --batches {args.batches} --steps {args.steps}{flags}`; "
        f"{(ours.get('params') or _stored_params(args.dir)) / 1e9:.2f}B parameters, bfloat16; "
        f"copy bandwidth measured {bandwidth / 1e12:.2f} TB/s (read+write); engine load {ours['load_s']:.0f} s; "
        f"grouped matmul: {ours['grouped_matmul']}; decode attention: {ours['decode_attention']}"
        + (f"; JAX peer: jax-ml/jax-llm-examples qwen3 at {jax_peer['commit']} (bench/jax_peer.py: bfloat16, "
           "unquantized dense KV cache, greedy in its step, timed as the engine is)" if jax_peer else "") + ".",
        "",
        "| batch | eaas-jax step ms median (min-max) | its host ms a step, not waiting for the device | tok/s | transformers step ms | vs transformers | roofline step ms | of roofline | greedy tokens equal (first 32, prompt 0) |"
        + (" JAX peer step ms | eaas-jax tok/s vs JAX peer | its tokens equal to transformers' (first 32) |"
           if jax_peer else "")
        + "".join(f" {label}: step ms (a token) | its share of roofline |"
                  + (" its tok/s vs JAX peer |" if jax_peer else "") + " its tokens equal (first 32) |"
                  for label, _ in variants)
        + " eaas-jax steps that compiled (left out of the timing) |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if jax_peer else "")
        + ("---|---|" + ("---|" if jax_peer else "") + "---|") * len(variants)
        + "---|",
    ]
    margins = peer.get("margins0")
    for batch in batches:
        o, p = ours[f"b{batch}"], peer[f"b{batch}"]
        roof = roofline_bytes(batch, args.steps) / bandwidth
        j = jax_peer[f"b{batch}"] if jax_peer else None
        lines.append(
            f"| {batch} | {step_ms(o)} | {host_ms(o)} | "
            f"{batch / o['median']:.0f} | {p['step'] * 1e3:.2f} | {p['step'] / o['median']:.2f}x | "
            f"{roof * 1e3:.2f} | {roof / o['median'] * 100:.0f}% | {agreement(o['tokens0'], p['tokens0'], margins)} |"
            + (f" {step_ms(j)} | {j['median'] / o['median']:.2f}x | {agreement(j['tokens0'], p['tokens0'], margins)} |"
               if jax_peer else "")
            + "".join(f" {step_ms(v)} | {roof / v['median'] * 100:.0f}% |"
                      + (f" {j['median'] / v['median']:.2f}x |" if jax_peer else "")
                      + f" {agreement(v['tokens0'], p['tokens0'], margins)} |"
                      for v in (run[f"b{batch}"] for _, run in variants))
            + f" {o['compiling_steps']} |"
        )
    lines += memory_lines(ours, batches)
    for label, run in (("eaas-jax", ours), *variants):
        for profile in run.get("profiles", []):
            lines += ["", *profile_lines(label, profile)]
        for profile in run.get("host_profiles", []):
            lines += ["", *host_profile_lines(label, profile)]
    publish(lines, args.append)
    if args.append:
        command = f"python bench/w1_decode_gpu.py --batches {args.batches} --steps {args.steps}{flags}"
        common = dict(device=f"1 x {device}", date=str(datetime.date.today()), commit=commit, command=command)
        rows = result_rows(ours, peer, jax_peer, batches, args.steps, common)
        for label, run in variants:
            rows += result_rows({**run, "bandwidth": bandwidth}, peer, jax_peer, batches, args.steps,
                                dict(common, variant=label))
        append_rows(os.path.join(REPO, "bench", "results", "w1_decode_gpu.jsonl"), rows)


def result_rows(ours: dict, hf: dict, jax_peer: dict | None, batches: list[int], steps: int,
                common: dict) -> list[dict]:
    """bench/results rows of a run (`ours`: the engine's, or a variant's, with
    `common` naming it): the engine's step per batch against the
    JAX peer's (else transformers'; ratio: ours / the peer's, under 1 is
    faster), with the roofline's share, transformers' step and the greedy
    agreement beside it."""
    rows = []
    for batch in batches:
        o, h = ours[f"b{batch}"], hf[f"b{batch}"]
        j = jax_peer[f"b{batch}"] if jax_peer else None
        peer_step = j["median"] if j else h["step"]
        roofline = roofline_bytes(batch, steps) / ours["bandwidth"]
        memory = o.get("step_memory")
        rows.append(dict(
            metric="w1_decode_step", batch=batch, value=o["median"] * 1e3, unit="ms",
            peer="jax-llm-examples qwen3" if j else "transformers", peer_value=peer_step * 1e3,
            ratio=o["median"] / peer_step, roofline_ms=roofline * 1e3, of_roofline=roofline / o["median"],
            transformers_ms=h["step"] * 1e3, tokens_equal_transformers=tokens_equal(o["tokens0"], h["tokens0"]),
            **({"jax_peer_tokens_equal_transformers": tokens_equal(j["tokens0"], h["tokens0"])} if j else {}),
            step_peak_bytes=memory and memory["peak"],
            compiling_steps=o["compiling_steps"], **common))
    return rows


if __name__ == "__main__":
    main()
