"""Open-loop load on `eaas-jax serve`: requests arrive as a Poisson process
(they do not wait for each other, as real users do not), each a streamed
completion; reports throughput, time to first token and inter-token latency
percentiles, and a plot. The server runs on loopback, started here once per
setting (embedded experts, then each --deployment), or is one at --url.

    python bench/serve_load.py --model checkpoints/tiny-moe [--deployment configs/deploy/tiny-moe-2-servers.toml] \\
        [--rate 8] [--requests 200] [--max-seconds 300] [--plot serve_load.png] [--raw requests.json]
        [--append bench/RESULTS.md]
    python bench/serve_load.py --plot-from requests.json --plot serve_load.png   # redraw an earlier run's plot

With --raw F --resume, the settings F already holds (a run cut short: F is
written as each setting ends) are taken from it and only the others run.

Bounded in count (--requests) and time (--max-seconds: requests not sent by
then are not sent; the report says how many ran). Needs httpx (the test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from _results import append_rows, git_commit, machine, mps_running, publish, run_facts  # noqa: E402

from eaas_jax.batch.runner import quantile  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog import os sys def class return yield".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, deployment: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "eaas_jax.cli", "serve", "--model", model, "--port", str(port), *extra]
    if deployment:
        command += ["--deployment", deployment]
    proc = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode})")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not become healthy in 15 minutes")


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """Streams one completion; its send time, token arrival times and counts."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.monotonic()
    arrivals, usage, error = [], None, None
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"sent": sent, "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk.get("usage"):
                    usage = chunk["usage"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    arrivals.append(time.monotonic())
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    return {"sent": sent, "arrivals": arrivals, "usage": usage, "error": error}


async def run_load(url: str, model: str, *, rate: float, requests: int, max_seconds: float, max_tokens: int,
                   seed: int, token_prompts: int | None = None) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    start = time.monotonic()
    tasks = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_seconds + 600), limits=limits) as http:
        at = 0.0
        for _ in range(requests):
            at += rng.expovariate(rate)
            if at > max_seconds:
                break
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            length = rng.randint(4, 48)
            prompt = ([rng.randrange(3, token_prompts) for _ in range(length)] if token_prompts else
                      " ".join(rng.choice(WORDS) for _ in range(length)))
            tasks.append(asyncio.ensure_future(one_request(http, url, model, prompt, max_tokens)))
        results = await asyncio.gather(*tasks)
    return results, time.monotonic() - start


#: the server's /metrics samples read before and after the measured load;
#: their differences say where its time went
SERVER_COUNTERS = {"eaas_step_compile_waits": "compile_waits", "eaas_step_programs": "programs_compiled",
                   "eaas_steps_total": "steps", "eaas_step_seconds_sum": "step_seconds",
                   "eaas_preemptions": "preemptions"}


def server_samples(url: str, names) -> dict[str, float]:
    """The samples of `names` off the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=60).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in names}


def server_counters(url: str) -> dict[str, float]:
    """SERVER_COUNTERS' samples, by their short names."""
    samples = server_samples(url, SERVER_COUNTERS)
    return {short: samples.get(name, 0.0) for name, short in SERVER_COUNTERS.items()}  # 0: an older server


def wait_for_warm_up(url: str, limit: float) -> float:
    """Waits (at most `limit` s) until the server's background warm-up has
    compiled every step program it foresaw; the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        left = server_samples(url, {"eaas_step_programs_compiling"}).get("eaas_step_programs_compiling", 0)
        if not left:
            break
        print(f"waiting for the server's warm-up: {left:.0f} step programs compiling", file=sys.stderr)
        time.sleep(5)
    return time.monotonic() - start


def completed(result: dict) -> bool:
    """Whether a request streamed tokens and no error."""
    return not result.get("error") and bool(result.get("arrivals"))


def summarize(results: list[dict], seconds: float) -> dict:
    done = [r for r in results if completed(r)]
    # why the others failed: "HTTP 429" (queue full), a stream's error, ...
    errors = collections.Counter((r.get("error") or "no tokens").split(":")[0] for r in results if not completed(r))
    ttft = [r["arrivals"][0] - r["sent"] for r in done]
    itl = [b - a for r in done for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["usage"]["completion_tokens"] for r in done if r["usage"])
    out = {"sent": len(results), "completed": len(done), "failed": len(results) - len(done), "seconds": seconds,
           "requests_per_s": len(done) / seconds, "output_tokens_per_s": tokens / seconds, "errors": dict(errors)}
    for name, values in (("ttft_s", ttft), ("itl_s", itl)):
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{round(q * 100)}"] = quantile(values, q)
    return out


def plot(runs: dict[str, tuple[list[dict], dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_itl) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (results, _) in runs.items():
        done = [r for r in results if completed(r)]
        for ax, values in ((ax_ttft, [r["arrivals"][0] - r["sent"] for r in done]),
                           (ax_itl, [b - a for r in done for a, b in zip(r["arrivals"], r["arrivals"][1:])])):
            values = sorted(values)
            ax.plot([v * 1e3 for v in values], [(i + 1) / len(values) for i in range(len(values))], label=label)
    ax_ttft.set(xlabel="time to first token, ms", ylabel="fraction of requests", xscale="log")
    ax_itl.set(xlabel="inter-token latency, ms", ylabel="fraction of token gaps", xscale="log")
    for ax in (ax_ttft, ax_itl):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def read_raw(path: str) -> dict[str, tuple[list[dict], dict]]:
    """The settings' requests and summaries of a --raw file."""
    with open(path) as f:
        return {label: (run["requests"], run["summary"]) for label, run in json.load(f).items()}


def write_raw(path: str, runs: dict[str, tuple[list[dict], dict]]) -> None:
    """`read_raw`'s file, whole or not at all (a run cut short keeps the
    settings it finished, for --resume)."""
    with open(path + ".tmp", "w") as f:
        json.dump({label: {"requests": requests, "summary": summary}
                   for label, (requests, summary) in runs.items()}, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, "checkpoints", "tiny-moe"))
    ap.add_argument("--deployment", action="append", default=[],
                    help="also serve with this deployment (repeatable); the first run is always embedded")
    ap.add_argument("--url", help="load a running server instead (its name from /v1/models)")
    ap.add_argument("--rate", type=float, default=8.0, help="requests per second, on average")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-prompts", type=int, metavar="VOCAB",
                    help="prompts of random token ids below VOCAB instead of words (a random-weight checkpoint, "
                         "whose tokenizer knows no words)")
    ap.add_argument("--warmup-load", type=int, default=0,
                    help="requests of the same load sent first and not measured (compiles the shapes the server's "
                         "own warm-up did not foresee)")
    ap.add_argument("--warm-up-wait", type=float, default=900.0,
                    help="seconds to wait at most for the server's background warm-up before loading it")
    ap.add_argument("--server-args", default="", help="more `eaas-jax serve` flags, one string")
    ap.add_argument("--plot", help="write a PNG of the latency distributions")
    ap.add_argument("--raw", help="write each setting's requests (send and token arrival times) and summary here, "
                                  "as JSON, as each setting ends, to redraw the plot elsewhere")
    ap.add_argument("--resume", action="store_true",
                    help="take the settings already in --raw (a run of this command cut short) from it; run the rest")
    ap.add_argument("--plot-from", metavar="RAW", help="only draw --plot from a --raw file of an earlier run")
    ap.add_argument("--append", help="append the table to this file (bench/RESULTS.md)")
    args = ap.parse_args()
    if args.resume and not args.raw:
        ap.error("--resume needs --raw")
    if args.plot_from:
        if not args.plot:
            ap.error("--plot-from needs --plot")
        plot(read_raw(args.plot_from), args.plot)
        return
    settings = [("given server", None)] if args.url else \
        [("embedded", None)] + [(os.path.basename(d), d) for d in args.deployment]
    # What a setting's numbers depend on besides its deployment: a resumed
    # run takes only settings measured under the same load.
    load = {name: getattr(args, name) for name in ("model", "rate", "requests", "max_seconds", "max_tokens", "seed",
                                                    "token_prompts", "warmup_load", "server_args")}
    labels = [label for label, _ in settings]
    kept = read_raw(args.raw) if args.resume and os.path.exists(args.raw) else {}
    runs = {label: kept[label] for label in labels if label in kept}
    for label, (_, summary) in runs.items():
        if summary.get("load") != load:
            sys.exit(f"error: {args.raw}'s setting {label!r} ran another load ({summary.get('load')}, not {load}): "
                     "resume with the same arguments, or drop --resume")
    for label, deployment in settings:
        if label in runs:
            print(f"{label}: taken from {args.raw}", file=sys.stderr)
            continue
        proc = None
        if args.url:
            url = args.url
        else:
            proc, url = start_server(args.model, deployment, args.server_args.split())
        try:
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            warm_up_seconds = wait_for_warm_up(url, args.warm_up_wait)
            if args.warmup_load:
                asyncio.run(run_load(url, model, rate=args.rate, requests=args.warmup_load,
                                     max_seconds=args.max_seconds, max_tokens=args.max_tokens, seed=args.seed + 1,
                                     token_prompts=args.token_prompts))
            before = server_counters(url)
            results, seconds = asyncio.run(run_load(url, model, rate=args.rate, requests=args.requests,
                                                    max_seconds=args.max_seconds, max_tokens=args.max_tokens,
                                                    seed=args.seed, token_prompts=args.token_prompts))
            after = server_counters(url)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
        server = {name: after[name] - before[name] for name in before}
        runs[label] = (results, {**summarize(results, seconds), **server, "warm_up_wait_s": warm_up_seconds,
                                 "step_time_share": server["step_seconds"] / seconds, "load": load})
        print(json.dumps({"setting": label, **runs[label][1]}), file=sys.stderr)
        if args.raw:  # after each setting
            write_raw(args.raw, runs)
    runs = {label: runs[label] for label in labels}  # embedded first: the peer of the others
    first = next(iter(runs.values()))[1]

    def ms(value):
        return "" if value is None else f"{value * 1e3:.1f}"

    peer = first["output_tokens_per_s"] or float("nan")  # embedded completed nothing: no ratio
    waited = ", ".join(f"{label} {s['warm_up_wait_s']:.0f} s" for label, (_, s) in runs.items())
    lines = [
        f"### Serving load, open loop ({datetime.date.today()}, commit {git_commit()})",
        "",
        f"Device: {machine()} (MPS daemon: {'yes' if mps_running() else 'no'}); "
        f"`python bench/serve_load.py {' '.join(sys.argv[1:])}`; "
        f"Poisson arrivals at {args.rate}/s, up to {args.requests} requests in {args.max_seconds:.0f} s, prompts "
        f"of 4-48 {'random tokens' if args.token_prompts else 'words'}, {args.max_tokens} tokens each at most (greedy, EOS allowed), streamed; "
        f"{args.warmup_load} requests of the same load sent first, not measured, after the server's background "
        f"warm-up ({waited}).",
        "",
        "| setting | completed / sent | req/s | output tok/s | vs embedded | TTFT p50 / p90 / p99 ms | "
        "ITL p50 / p90 / p99 ms | steps (mean ms, step time / wall) | steps waiting for a compile (programs compiled) | "
        "preemptions | failed, why |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {label} | {s['completed']} / {s['sent']} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | "
          f"{s['output_tokens_per_s'] / peer:.2f} | "
          f"{ms(s['ttft_s_p50'])} / {ms(s['ttft_s_p90'])} / {ms(s['ttft_s_p99'])} | "
          f"{ms(s['itl_s_p50'])} / {ms(s['itl_s_p90'])} / {ms(s['itl_s_p99'])} | "
          f"{s['steps']:.0f} ({ms(s['step_seconds'] / max(s['steps'], 1))}, {s['step_time_share']:.0%}) | "
          f"{s['compile_waits']:.0f} ({s['programs_compiled']:.0f}) | {s['preemptions']:.0f} | "
          f"{', '.join(f'{n} {why}' for why, n in s['errors'].items()) or '0'} |"
          for label, (_, s) in runs.items()),
        "",
    ]
    if args.plot:
        plot(runs, args.plot)
        lines.append(f"Plot: `{args.plot}`.\n")
    publish(lines, args.append)
    if args.append:
        common = run_facts(machine(), "tok/s")
        append_rows(os.path.join(REPO, "bench", "results", "serve_load.jsonl"), [
            dict(metric=f"serve_output_tokens_per_s_{label}", value=s["output_tokens_per_s"], peer="embedded",
                 peer_value=first["output_tokens_per_s"], ratio=s["output_tokens_per_s"] / peer,
                 **{k: v for k, v in s.items() if k.startswith(("ttft", "itl", "compile"))
                    or k in (*SERVER_COUNTERS.values(), "step_time_share", "errors")}, **common)
            for label, (_, s) in runs.items()])


if __name__ == "__main__":
    main()
