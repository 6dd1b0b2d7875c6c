"""The `eaas-jax` command: generate, batch, serve, serve-experts, train, convert, plan-placement."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
import tomllib
import time

from eaas_jax import compile_cache


def _add_model_arg(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (this project's or HF safetensors)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate completions from a checkpoint")
    _add_model_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; its completion is printed")
    src.add_argument("--input", help="JSONL file: one prompt per line, a string or an object "
                     "with 'prompt' (text or token ids) and optional sampling fields")
    p.add_argument("--output", help="JSONL file for the results of --input (default: stdout)")
    p.add_argument("--chat", action="store_true",
                   help="send each text prompt as a user message through the chat template")
    _add_sampling_and_engine_args(p)
    p.set_defaults(func=_generate)


def _add_batch(sub) -> None:
    p = sub.add_parser(
        "batch", help="run a JSONL file of requests, writing each result as it finishes (resumable)",
        description="Runs every request of --input, appending each result to --output the moment its request "
                    "finishes. Lines: a prompt string; an object with 'prompt' or 'messages', an optional "
                    "'custom_id' and sampling fields; or an OpenAI batch line (custom_id, method, url "
                    "/v1/completions or /v1/chat/completions, body). A bad line becomes an error record naming "
                    "file:line and the run goes on. Rerunning the same command resumes: requests already in "
                    "--output are skipped. SIGINT/SIGTERM stop after the current step.")
    _add_model_arg(p)
    p.add_argument("--input", required=True, help="JSONL file of requests")
    p.add_argument("--output", required=True, help="JSONL file of results (resumed if it exists)")
    p.add_argument("--overwrite", action="store_true", help="start --output afresh instead of resuming it")
    p.add_argument("--summary-json", help="also write the run's figures (counts, tokens/s, TTFT and time per "
                   "output token percentiles) to this JSON file")
    p.add_argument("--plot", help="also write a PNG of the run (tokens and tokens/s over time, per-request "
                   "latencies); needs matplotlib (the plot extra)")
    _add_sampling_and_engine_args(p)
    p.set_defaults(func=_batch)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a checkpoint over the OpenAI HTTP API",
        description="Serves --model over an OpenAI-compatible HTTP API: POST /v1/completions and "
                    "/v1/chat/completions (streamed with stream: true), GET /v1/models, /health and /metrics "
                    "(Prometheus). Requests that leave a sampling field out get the checkpoint's "
                    "generation_config.json values, else the API's defaults.")
    _add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model's name in the API (default: --model's directory name)")
    p.add_argument("--api-key", default=os.environ.get("EAAS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $EAAS_API_KEY; none: open)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences unfinished at once at most (a request of n choices counts n); "
                        "more get 429 (retry later)")
    p.add_argument("--warmup", nargs=2, type=int, metavar=("PROMPT_TOKENS", "MAX_TOKENS"), default=(128, 256),
                   help="before serving, compile the step shapes of requests up to this size, --max-num-seqs "
                        "arriving at once or a few at a time (the first steps' now; on a GPU host the rest in the "
                        "background: /metrics' eaas_step_programs_compiling counts them down)")
    p.add_argument("--no-warmup", dest="warmup", action="store_const", const=None, help="serve at once")
    _add_engine_args(p)
    p.set_defaults(func=_serve)


# Sampling flags -> SamplingParams fields. Unset flags take the Python API's
# defaults: the checkpoint's generation_config.json over SamplingParams'.
_SAMPLING_FLAGS = {"max_tokens": "max_tokens", "min_tokens": "min_tokens", "temperature": "temperature",
                   "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed", "n": "n", "stop": "stop",
                   "ignore_eos": "ignore_eos", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty", "repetition_penalty": "repetition_penalty"}


def _add_sampling_and_engine_args(p) -> None:
    """The sampling defaults (what a request line does not set) and the engine's options."""
    _add_sampling_args(p)
    _add_engine_args(p)
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the step shapes the requests will need before the first step (the rest in the "
                        "background while it runs), with a progress line (default: on with --input and for "
                        "batch, off for one --prompt)")


def _add_sampling_args(p) -> None:
    group = p.add_argument_group(
        "sampling", "defaults of every request (a request line may set its own); unset: the checkpoint's "
        "generation_config.json, else SamplingParams' defaults, as in the Python API")
    unset = argparse.SUPPRESS
    group.add_argument("--max-tokens", type=int, default=unset, help="tokens to generate at most (API default 16)")
    group.add_argument("--min-tokens", type=int, default=unset, help="tokens before EOS or a stop may end a completion")
    group.add_argument("--temperature", type=float, default=unset, help="0: greedy (API default 1.0)")
    group.add_argument("--top-p", type=float, default=unset, help="nucleus sampling mass")
    group.add_argument("--top-k", type=int, default=unset, help="0: no top-k cut")
    group.add_argument("--min-p", type=float, default=unset, help="drop tokens below this fraction of the top one")
    group.add_argument("--presence-penalty", type=float, default=unset, help="in [-2, 2]")
    group.add_argument("--frequency-penalty", type=float, default=unset, help="in [-2, 2]")
    group.add_argument("--repetition-penalty", type=float, default=unset, help="> 0; 1: none")
    group.add_argument("--seed", type=int, default=unset, help="per-request sampling seed")
    group.add_argument("-n", type=int, default=unset, help="completions per prompt")
    group.add_argument("--stop", action="append", default=unset, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", default=unset)


def _add_engine_args(p) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences in flight at most")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--decode-window", type=int, default=None,
                   help="decode tokens a sequence samples per step program: the host's per-step cost once per "
                        "window, tokens then arriving that many at a time (experts in the engine only; default: "
                        "4 without a deployment, else 1)")
    p.add_argument("--deployment", help="deployment TOML: run the experts in expert servers "
                   "(started here unless --registry is given)")
    p.add_argument("--registry", help="etcd://HOST:PORT (etcds:// for TLS) where the deployment's servers "
                   "registered; credentials and certificates from $EAAS_ETCD_* (README)")
    _add_compile_cache_arg(p)


def _add_compile_cache_arg(p) -> None:
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="keep compiled programs here for later runs; 'off': none (default: $EAAS_COMPILE_CACHE, "
                        "else ~/.cache/eaas-jax/xla)")


def _read_prompts(path: str, defaults) -> tuple[list, list]:
    """generate --input: the prompts and params of `path`; the first bad line
    ends the run (`batch` records it and goes on)."""
    from eaas_jax.batch.formats import BadLine, read_requests

    try:
        items = read_requests(path, defaults)
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror}")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    for item in items:
        if isinstance(item, BadLine):
            raise SystemExit(f"{item.where}: {item.reason}")
        if item.prompt is None or item.openai_url is not None:
            raise SystemExit(f"{item.where}: generate --input takes prompts; run chats and OpenAI batch lines "
                             "with `eaas-jax batch`")
    return [item.prompt for item in items], [item.params for item in items]


def _sampling_defaults(args):
    """The SamplingParams of the command line (what request lines do not
    set): the flags given, over the checkpoint's generation_config.json, over
    SamplingParams' defaults (Engine.default_sampling_params: the same)."""
    from eaas_jax.engine.generation_config import GenerationDefaults

    given = {field: getattr(args, flag) for flag, field in _SAMPLING_FLAGS.items() if hasattr(args, flag)}
    try:
        return dataclasses.replace(GenerationDefaults.load(args.model).sampling_params(), **given)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def _open_engine(args):
    """The engine of the command line's options; a bad deployment or an
    unreachable registry is one error line."""
    from eaas_jax.control_plane.deployment import DeploymentError
    from eaas_jax.control_plane.registry import RegistryError
    from eaas_jax.engine import Engine

    if args.registry and not args.deployment:
        raise SystemExit("error: --registry needs --deployment (the servers it names)")
    compile_cache.enable(args.compile_cache)
    try:
        return Engine(
            args.model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, dtype=args.dtype,
            deployment=args.deployment, registry=args.registry, decode_window=args.decode_window,
        )
    except (DeploymentError, RegistryError) as e:  # a bad file, etcd refusing or unreachable: no traceback
        raise SystemExit(f"error: {e}")


def _batch(args) -> int:
    from eaas_jax.batch.formats import read_requests
    from eaas_jax.batch.results import ResultsFile, ResultsFileError
    from eaas_jax.batch.runner import report, run_batch, summary_dict

    defaults = _sampling_defaults(args)
    if args.plot:
        from eaas_jax.batch.plot import PlotUnavailableError, check_available

        try:  # before any work: a run must not end without the plot it was asked for
            check_available()
        except PlotUnavailableError as e:
            raise SystemExit(f"error: {e}")
    try:
        items = read_requests(args.input, defaults)
    except OSError as e:
        raise SystemExit(f"error: cannot read {args.input}: {e.strerror}")
    except ValueError as e:  # the input as a whole (duplicate ids)
        raise SystemExit(f"error: {e}")
    if not items:
        raise SystemExit(f"error: {args.input} holds no requests")
    try:  # before any model work: an output that cannot be written fails now
        results = ResultsFile(args.output, {item.custom_id for item in items}, overwrite=args.overwrite)
    except ResultsFileError as e:
        raise SystemExit(f"error: {e}")
    with results:
        failed_before = f" ({len(results.failed)} of them error records: delete those lines to run them again)" \
            if results.failed else ""
        if all(item.custom_id in results.done for item in items):
            print(f"every request of {args.input} is in {args.output} already{failed_before}", file=sys.stderr)
            return 1 if results.failed else 0
        if results.done:
            print(f"resuming: {len(results.done)} of {len(items)} requests are in {args.output} "
                  f"already{failed_before}", file=sys.stderr)
        with _open_engine(args) as engine:
            summary = run_batch(engine, items, results, model=args.model, warmup=args.warmup is not False)
    report(summary, args.output)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary_dict(summary), f, indent=1)
    if args.plot:
        from eaas_jax.batch.plot import write_plot

        write_plot(summary, args.plot, title=os.path.basename(args.input))
        print(f"plot: {args.plot}", file=sys.stderr)
    if summary.interrupted and summary.left:
        return 130 if summary.interrupted == "SIGINT" else 143
    return 1 if results.failed else 0


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGINT/SIGTERM only stop it: uvicorn
        raises the signal again once stopped, which would end the process
        before the engine shuts its expert servers down."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _serve(args) -> int:
    import uvicorn

    from eaas_jax.serve import AsyncEngine, build_app

    server_class = _uvicorn_server()
    if args.max_queue < 1:
        raise SystemExit(f"error: --max-queue must be >= 1, got {args.max_queue}")
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    with _open_engine(args) as engine:
        if args.warmup is not None:
            prompt_tokens, max_tokens = args.warmup
            engine.warm_up(traffic=(min(prompt_tokens, engine.max_model_len - 1), max_tokens))
        async_engine = AsyncEngine(engine, max_queue=args.max_queue)
        try:
            app = build_app(async_engine, model=name, api_key=args.api_key)
            print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
            server_class(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=10,
                                   log_level="info" if args.verbose else "warning")).run()
        finally:
            async_engine.shutdown()
    return 0


def _generate(args) -> int:
    from eaas_jax.batch.formats import completion_dict
    from eaas_jax.engine import ExpertServerError

    defaults = _sampling_defaults(args)
    if args.prompt is not None:
        prompts, params = [args.prompt], [defaults]
    else:
        prompts, params = _read_prompts(args.input, defaults)
        if not prompts:
            raise SystemExit(f"{args.input}: no prompts")
    engine = _open_engine(args)
    if args.chat and not all(isinstance(p, str) for p in prompts):
        raise SystemExit("error: --chat needs text prompts, not token ids")
    start, failure = time.time(), None
    try:
        with engine:
            batch = args.input is not None
            warmup = batch if args.warmup is None else args.warmup
            if args.chat:
                conversations = [[{"role": "user", "content": p}] for p in prompts]
                outputs = engine.chat(conversations, params, use_tqdm=batch, warmup=warmup)
            else:
                outputs = engine.generate(prompts, params, use_tqdm=batch, warmup=warmup)
    except ExpertServerError as e:
        if e.outputs is None or args.prompt is not None:
            raise SystemExit(f"error: {e}")
        outputs, failure = e.outputs, e  # a batch keeps what completed; the failed lines say why
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    elapsed = time.time() - start
    if args.prompt is not None:
        for c in outputs[0].outputs:
            print(c.text if args.chat else args.prompt + c.text)
        return 0
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for o in outputs:
            out.write(json.dumps(completion_dict(o)) + "\n")
    finally:
        if args.output:
            out.close()
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(
        f"{len(outputs)} requests, {prompt_tokens} prompt tokens, {generated} generated tokens "
        f"in {elapsed:.1f} s: {len(outputs) / elapsed:.2f} req/s, "
        f"{generated / elapsed:.1f} generated tok/s, {(prompt_tokens + generated) / elapsed:.1f} total tok/s",
        file=sys.stderr,
    )
    if failure is not None:
        raise SystemExit(f"error: {failure}")
    return 0


def _add_serve_experts(sub) -> None:
    p = sub.add_parser("serve-experts", help="run one expert server of a deployment")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--deployment", required=True, help="deployment TOML (configs/deploy/)")
    p.add_argument("--server", required=True,
                   help="which of the deployment's servers this is; a name not in the file joins on a spare "
                        "endpoint, hosting --layers x --experts")
    p.add_argument("--layers", help='MoE layers a joining server hosts: "all" or indices and ranges, e.g. "0-3,7"')
    p.add_argument("--experts", help='experts a joining server hosts: "all" or indices and ranges, e.g. "0-15"')
    p.add_argument("--endpoint", type=int, help=argparse.SUPPRESS)  # a LocalCluster's pick of a spare endpoint
    p.add_argument("--registry", help="etcd://HOST:PORT (etcds:// for TLS) to register in (lease as heartbeat); "
                   "credentials and certificates from $EAAS_ETCD_* (README)")
    p.add_argument("--shm-name", help="shared-memory name (default: the deployment's name)")
    p.add_argument("--nic-host", type=_ipv4,
                   help="transport = \"ibgda\": the IPv4 address this server's NIC listens on, reachable by "
                        "its clients (default: $EAAS_NIC_HOST, else 127.0.0.1: this host only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _add_compile_cache_arg(p)
    # Exit when stdin closes (the engine that started this server died).
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_serve_experts)


def _serve_experts(args) -> int:
    from eaas_jax.checkpoint import CheckpointError
    from eaas_jax.engine.dtypes import resolve_dtype
    from eaas_jax.control_plane.deployment import DeploymentError
    from eaas_jax.expert_server.server import run_expert_server
    from eaas_jax.control_plane.registry import RegistryError

    parent = None
    if args.exit_with_parent:  # before anything slow: an orphan must not even finish starting
        from eaas_jax.expert_server.parent_watch import ParentWatch

        parent = ParentWatch()
    compile_cache.enable(args.compile_cache)
    joining = None
    if args.layers is not None or args.experts is not None:
        joining = tuple(_index_list(v) for v in (args.layers or "all", args.experts or "all"))
    try:
        if args.nic_host is not None:
            os.environ["EAAS_NIC_HOST"] = args.nic_host  # where the transport's endpoint listens
        run_expert_server(
            args.model, args.deployment, args.server, joining=joining, endpoint=args.endpoint,
            shm_name=args.shm_name, registry=args.registry, dtype=resolve_dtype(args.dtype),
            parent=parent,
        )
    except (CheckpointError, DeploymentError, RegistryError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    return 0


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from None


def _index_list(text: str):
    """ "all" -> "all"; "0-3,7" -> ["0-3", 7]: the deployment file's syntax."""
    if text == "all":
        return text
    return [int(part) if part.strip().isdigit() else part.strip() for part in text.split(",")]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a small MoE on the stdlib sources and save a checkpoint")
    p.add_argument("--config", required=True, help="model config JSON (e.g. configs/tiny-moe.json)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--data-root", default=None, help="directory of .py files (default: the stdlib)")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from eaas_jax.model.config import ModelConfig
    from eaas_jax.train.trainer import TrainSettings, train

    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        learning_rate=args.lr, seed=args.seed, eval_every=args.eval_every,
        data_root=args.data_root,
    )
    record = train(ModelConfig.load(args.config), args.out, settings)
    last = record["history"][-1]
    print(
        f"saved {args.out}: {record['parameters']:,} parameters, "
        f"train loss {last['train_loss']:.3f}, held-out loss {last['held_out_loss']:.3f}, "
        f"{record['train_time_s']:.0f} s"
    )
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a HF model directory (safetensors) to this "
                       "project's checkpoint directory")
    p.add_argument("--from-hf", required=True, metavar="DIR",
                   help="HF model directory: config.json and *.safetensors")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="dtype of the stored parameters")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    import jax.numpy as jnp

    from eaas_jax.checkpoint import CheckpointError, convert_checkpoint
    from eaas_jax.checkpoint.hf import is_hf_directory

    if not is_hf_directory(args.from_hf):
        raise SystemExit(f"error: {args.from_hf} is not a HF model directory "
                         "(needs config.json and model.safetensors or model.safetensors.index.json)")
    start = time.time()
    try:
        config = convert_checkpoint(args.from_hf, args.out, dtype=jnp.dtype(args.dtype),
                                    overwrite=args.force)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.out}: {config.num_layers} layers, {config.num_moe_layers} MoE layers of "
          f"{config.num_experts} experts, {args.dtype}, in {time.time() - start:.1f} s", file=sys.stderr)
    return 0


def _add_plan_placement(sub) -> None:
    from eaas_jax.transport import backends

    p = sub.add_parser("plan-placement", help="write a deployment file placing the experts on N servers")
    p.add_argument("--model", required=True, help="checkpoint directory (for its number of experts)")
    p.add_argument("--servers", required=True,
                   help="how many servers (named experts-0, experts-1, ...) or their names, comma-separated")
    p.add_argument("--replicas", type=int, default=1, help="copies of every expert")
    p.add_argument("--load", help="measured load: a Prometheus text file of eaas_expert_tokens_total "
                                  "(engine.metrics_text()) or a .npy array [layers, experts]")
    p.add_argument("--hot-replicas", type=int, default=0,
                   help="one more copy for this many of the most loaded experts (needs --load)")
    p.add_argument("--name", default="planned", help="deployment name")
    p.add_argument("--transport", default=backends.DEFAULT, choices=backends.names(),
                   help="the deployment's transport: shm for CPU processes, "
                        "cuda_ipc for GPUs of one host")
    p.add_argument("--out", required=True, help="deployment TOML to write")
    p.set_defaults(func=_plan_placement)


def _read_load(path: str, num_moe_layers: int, num_experts: int):
    import numpy as np

    from eaas_jax.engine.metrics import read_expert_tokens

    if path.endswith(".npy"):
        return np.load(path)
    with open(path) as f:
        try:
            return read_expert_tokens(f.read(), num_moe_layers, num_experts)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _plan_placement(args) -> int:
    from eaas_jax.checkpoint import CheckpointError
    from eaas_jax.checkpoint.directory import load_config
    from eaas_jax.control_plane.deployment import Deployment, DeploymentError
    from eaas_jax.control_plane.placement import deployment_toml, plan_placement

    try:
        config = load_config(args.model)
        servers = ([f"experts-{i}" for i in range(int(args.servers))] if args.servers.isdigit()
                   else [s.strip() for s in args.servers.split(",")])
        load = None if args.load is None else _read_load(args.load, config.num_moe_layers, config.num_experts)
        placement = plan_placement(config.num_experts, servers, replicas=args.replicas, load=load,
                                   hot_replicas=args.hot_replicas)
        text = deployment_toml(args.name, placement, transport=args.transport)
        Deployment.from_dict(tomllib.loads(text), source=args.out).check(config)  # names, ranges
    except (CheckpointError, DeploymentError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    with open(args.out, "w") as f:
        f.write(text)
    for server, experts in placement.items():
        print(f"{server}: {len(experts)} experts", file=sys.stderr)
    return 0


class _Subcommands:
    """argparse's subparsers, each made with the options every subcommand
    takes and a --help that shows the defaults."""

    def __init__(self, subparsers, common: argparse.ArgumentParser):
        self._subparsers, self._common = subparsers, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, parents=[self._common],
                                           formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("eaas-jax")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not the stream
    of when it was made (a caller may swap sys.stderr, as pytest does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _log_to_stderr(level: int) -> None:
    """Log records at `level` and above to stderr, one line each. Replaces
    the plain stream handlers of logging.basicConfig (absl, imported with
    orbax, installs one when it first logs, which would make basicConfig here
    a no-op) and an earlier call's; leaves any other handler alone."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) in (logging.StreamHandler, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns its exit code. A failure is one `error: ...`
    line on stderr and exit code 2 (with --debug, an unexpected one shows its
    traceback)."""
    parser = argparse.ArgumentParser(prog="eaas-jax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # Accepted before and after the subcommand: a subcommand's copy leaves the
    # value alone unless given there (SUPPRESS).
    common = argparse.ArgumentParser(add_help=False)
    for p, default in ((parser, False), (common, argparse.SUPPRESS)):
        p.add_argument("-v", "--verbose", action="store_true", default=default, help="log at INFO level")
        p.add_argument("--debug", action="store_true", default=default,
                       help="show the traceback of an unexpected error")
    sub = _Subcommands(parser.add_subparsers(dest="command", required=True), common)
    for add in (_add_generate, _add_batch, _add_serve, _add_serve_experts, _add_train, _add_convert, _add_plan_placement):
        add(sub)
    args = parser.parse_args(argv)
    _log_to_stderr(logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for a person; --debug for the rest
        if args.debug:
            raise
        message = f"{type(e).__name__}: {e} (--debug shows the traceback)"
    print(message if message.startswith("error:") else f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
