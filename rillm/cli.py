"""The `rillm` command. The only module that reads argv and the environment."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rillm import __version__
from rillm.parsers.reasoning import REASONING_PARSERS
from rillm.parsers.tool_calls import TOOL_CALL_PARSERS

if TYPE_CHECKING:
    from rillm.config import EngineConfig


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rillm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rillm {__version__}")
    commands = parser.add_subparsers(dest="command")

    generate = commands.add_parser(
        "generate", help="stream one answer to the terminal",
        description="Generate text for PROMPT and stream it to stdout as it is produced.",
    )
    generate.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    add_engine_args(generate)
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=None,
                          help="a stop string (repeatable)")
    generate.add_argument("--system", default=None, help="a system message for the chat template")
    generate.add_argument("--raw", action="store_true",
                          help="send the prompt as is, without the chat template")
    generate.set_defaults(handler=run_generate)

    serve = commands.add_parser(
        "serve", help="serve a model over the OpenAI API",
        description="Serve MODEL (default: SmolLM2-135M-Instruct) with an OpenAI-compatible "
        "HTTP API: /v1/chat/completions, /v1/completions, /v1/models.",
    )
    serve.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                       help="a GGUF file, a Hugging Face directory, or an installed model's name "
                       "(smollm2, gemma3-270m)")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="the name(s) clients use; the first is reported by /v1/models")
    serve.add_argument("--api-key", nargs="+", metavar="KEY",
                       default=[k for k in os.environ.get("RILLM_API_KEY", "").split(",") if k],
                       help="require one of these keys as 'Authorization: Bearer KEY' or "
                            "'x-api-key: KEY' (default: $RILLM_API_KEY, comma-separated)")
    serve.add_argument("--chat-template", default=None,
                       help="a Jinja chat template, or a file holding one")
    serve.add_argument("--allowed-hosts", nargs="*", default=[], metavar="HOST",
                       help="Host names to answer besides localhost / 127.0.0.1 / ::1 when "
                            "--host is a loopback address (a proxy's public name)")
    serve.add_argument("--grammar-compile-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="a structured-outputs grammar that takes longer to compile is "
                            "the request's 400")
    serve.add_argument("--max-request-body-bytes", type=int, default=None, metavar="BYTES",
                       help="a request body over this is a 413, refused before it is read "
                            "(default 8 MiB)")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="let requests bring their own chat_template (it runs on the "
                            "server, in a sandbox process bounded in time and memory); "
                            "without it such a request is a 400")
    serve.add_argument("--chat-template-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="a request's own chat_template that takes longer to render is "
                            "the request's 400")
    serve.add_argument("--stream-interval", type=int, default=1,
                       help="tokens per streamed event, at most")
    serve.add_argument("--allowed-origins", nargs="*", default=[],
                       help="origins allowed by CORS (default: CORS off)")
    serve.add_argument("--max-queued-requests", type=int, default=None, metavar="SEQUENCES",
                       help="sequences (n and each prompt of a list count) that may wait "
                       "beyond --max-num-seqs before new requests get a 429 (default 256)")
    serve.add_argument("--max-connections", type=int, default=512,
                       help="open connections at most; past it a request is a 503 with "
                            "Retry-After")
    serve.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="a request's headers must arrive within this, and its body may "
                            "pause no longer (slow clients are cut off)")
    serve.add_argument("--send-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="a client that reads nothing of its response for this long is "
                            "dropped (its request aborted)")
    serve.add_argument("--stream-resume-window", type=float, default=0.0, metavar="SECONDS",
                       help="keep a stream running this long after its connection breaks, "
                            "resumable by sending the request again with Last-Event-ID "
                            "(events then carry id:); default 0: off, a disconnect aborts")
    serve.add_argument("--keepalive-interval", type=float, default=10.0,
                       help="seconds of silence after which a stream gets a keep-alive comment")
    serve.add_argument("--reasoning-parser", default=None, choices=list(REASONING_PARSERS),
                       help="put the model's thinking in delta.reasoning / message.reasoning")
    serve.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                       help="sampling defaults for what a request leaves unset: auto (the "
                            "model directory's generation_config.json, if any), vllm (none: "
                            "OpenAI's defaults), or a directory holding one")
    serve.add_argument("--enable-log-requests", action="store_true",
                       help="log one line per request once it has ended: its id and "
                            "X-Request-Id, token counts, finish reason, timings and sampling "
                            "settings (never its text)")
    serve.add_argument("--reasoning-field", default="reasoning",
                       choices=["reasoning", "reasoning_content", "both"],
                       help="the chat field the thinking goes in: vLLM's `reasoning` (the "
                            "default), llama.cpp's and DeepSeek's `reasoning_content`, or both")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let tool_choice "auto" parse tool calls from the output')
    serve.add_argument("--tool-call-parser", default=None, choices=list(TOOL_CALL_PARSERS),
                       help="the model's tool-call format")
    serve.add_argument("--default-chat-template-kwargs", default=None, metavar="JSON",
                       help='e.g. \'{"enable_thinking": false}\'; requests may override')
    serve.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                       help="engine replicas on Ray Serve, each with its share of the cores "
                       "(needs pip install 'rillm[ray]'; docs/ray.md)")
    serve.add_argument("--routing-policy", default="prefix", choices=["prefix", "least-loaded"],
                       help="with --data-parallel-size: send a prompt to the replica holding "
                       "its prefix (default, within a balance threshold) or to the least loaded")
    serve.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="run the replicas on this Ray cluster (default: a local Ray "
                       "instance, or the cluster RAY_ADDRESS names)")
    serve.add_argument("--uvicorn-log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    serve.set_defaults(handler=run_serve)

    chat = commands.add_parser(
        "chat", help="chat with a served model in the terminal",
        description="Chat with any OpenAI-compatible server. Interactive on a terminal; with "
        "-p PROMPT or piped input, print the answer and exit.",
    )
    chat.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL",
                                                           "http://127.0.0.1:8000/v1"))
    chat.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    chat.add_argument("--model", default=None, help="default: the first of /v1/models")
    chat.add_argument("-p", "--prompt", default=None, help="ask this, print the answer, exit")
    chat.add_argument("--system", default=None, help="a system message")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.set_defaults(handler=run_chat)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve = bench_commands.add_parser(
        "serve", help="load OpenAI-compatible servers with streaming requests",
        description="Measure one or more running OpenAI-compatible servers side by side "
        "(interleaved): throughput, TTFT, TPOT, ITL and latency percentiles, failures.",
    )
    bench_serve.add_argument(
        "--server", action="append", default=None, metavar="[NAME=]URL",
        help="a server's base URL (…/v1), repeatable (default: http://127.0.0.1:8000/v1)")
    bench_serve.add_argument("--model", default=None,
                             help="model name to request (default: each server's first)")
    bench_serve.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    bench_serve.add_argument("--endpoint", choices=["completions", "chat"],
                             default="completions")
    bench_serve.add_argument("--dataset", choices=["random", "fixed", "conversations"],
                             default="random")
    bench_serve.add_argument("--input-len", type=int, default=128,
                             help="prompt tokens (random and fixed datasets)")
    bench_serve.add_argument("--output-len", type=int, default=128,
                             help="output tokens per request (max_tokens, with ignore_eos)")
    bench_serve.add_argument("--natural-length", action="store_true",
                             help="let outputs end on their own (no ignore_eos; --output-len "
                             "still caps them)")
    bench_serve.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                             help="levels of concurrent requests (default: 1 8 32)")
    bench_serve.add_argument("--request-rate", type=float, nargs="+", default=None,
                             help="Poisson arrival rates per second, each run at every "
                             "concurrency level (default: all requests at once)")
    bench_serve.add_argument("--num-prompts", type=int, default=None,
                             help="requests per level (default: 4 per concurrent slot of "
                             "the level, at least 8)")
    bench_serve.add_argument("--rounds", type=int, default=1,
                             help="repeat every level; the median round is reported")
    bench_serve.add_argument("--tokenizer", default=None,
                             help="GGUF or HF directory for counting prompt tokens "
                             "(default: the default model's)")
    bench_serve.add_argument("--seed", type=int, default=0)
    bench_serve.add_argument("--json", default=None, metavar="FILE", help="write results")
    bench_serve.add_argument("--plot", default=None, metavar="PNG",
                             help="plot throughput and latency against concurrency")
    bench_serve.add_argument("--timeout", type=float, default=600.0,
                             help="seconds one request may take")
    bench_serve.set_defaults(handler=run_bench_serve)
    return parser


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a GGUF file or Hugging Face directory "
                        "(default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="sequences in one step (default: 64 on the CPU, 256 on CUDA)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens in one step (default: 1024 on the CPU, 8192 on CUDA)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-space", type=float, default=0.5, metavar="GIB",
                        help="memory for the KV cache in GiB")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "gguf"],
                        help="auto (default): gguf on a CPU with --dtype auto; gguf: run a "
                        "GGUF's blocks (Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K) as they are; none: "
                        "dequantize them (the exact, "
                        "batch-invariant reference)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="FRACTION",
                        help="on CUDA: the share of the card's memory for the model and the KV "
                        "cache (the cache takes what the model leaves)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="on CUDA: run decode steps op by op instead of replaying the CUDA "
                        "graphs captured at start-up")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                        help="split the model over N processes (torch.distributed: gloo on the "
                        "CPU, nccl on CUDA); Llama-family models")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads for the model's steps (default: all cores)")
    parser.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="on the CPU, rillm's C++ kernels (built once, cached in "
                        "~/.cache/rillm/kernels); --no-cpu-kernels: the PyTorch path only")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings from the command line."""
    from rillm.config import STEP_DEFAULTS, EngineConfig

    seqs, tokens = STEP_DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    return EngineConfig(
        model=getattr(args, "model_path", None) or args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=seqs if args.max_num_seqs is None else args.max_num_seqs,
        max_num_batched_tokens=(tokens if args.max_num_batched_tokens is None
                                else args.max_num_batched_tokens),
        block_size=args.block_size,
        kv_cache_space_gib=args.kv_cache_space,
        enable_prefix_caching=args.enable_prefix_caching,
        quantization=args.quantization,
        num_threads=args.num_threads,
        cpu_kernels=args.cpu_kernels,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
    )


def run_generate(args: argparse.Namespace) -> int:
    # Heavy imports only once the arguments are known to be good.
    from rillm.engine.offline import LLM
    from rillm.loader import ModelLoadError
    from rillm.sampling_params import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            max_tokens=args.max_tokens, stop=args.stop,
        )
        llm = LLM(config=engine_config(args))
    except (ValueError, ModelLoadError) as exc:
        print(f"rillm: error: {exc}", file=sys.stderr)
        return 2
    tokenizer = llm.get_tokenizer()
    if args.raw or not llm.chat_template:
        ids = tokenizer.encode(prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(
            messages, chat_template=llm.chat_template, add_generation_prompt=True,
            tokenize=False,
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
    try:
        for out in llm.stream(ids, params):
            sys.stdout.write(out.outputs[0].text)
            sys.stdout.flush()
    except ValueError as exc:
        print(f"rillm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass  # the stream aborted its request
    sys.stdout.write("\n")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from rillm.client.chat import ChatError, ChatOptions, interactive, one_shot

    options = ChatOptions(base_url=args.base_url, api_key=args.api_key, model=args.model,
                          system=args.system, temperature=args.temperature,
                          max_tokens=args.max_tokens)
    try:
        if args.prompt is not None:
            return one_shot(options, args.prompt, sys.stdout)
        if not sys.stdin.isatty():
            return one_shot(options, sys.stdin.read(), sys.stdout)
        return interactive(options)
    except ChatError as exc:
        print(f"rillm chat: {exc}", file=sys.stderr)
        return 1


def _sampling_defaults(choice: str, model: str | None) -> dict[str, float]:
    """--generation-config: the sampling defaults it names (logged when there are any)."""
    from rillm.loader.generation_config import sampling_defaults

    if choice == "vllm":
        return {}
    directory = model if choice == "auto" else choice
    if choice != "auto" and not os.path.isdir(choice):
        raise ValueError(f"--generation-config {choice}: not auto, vllm or a directory")
    defaults = sampling_defaults(directory) if directory and os.path.isdir(directory) else {}
    if defaults:
        print("rillm: sampling defaults from generation_config.json: " + ", ".join(
            f"{key}={value:g}" for key, value in defaults.items()), flush=True)
    return defaults


def run_serve(args: argparse.Namespace) -> int:
    from rillm.loader import DEFAULT_MODEL_NAME, KNOWN_MODELS
    from rillm.server.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUED, ServerConfig
    from rillm.server.connections import ConnectionLimits

    started = process_started()
    model = getattr(args, "model_path", None) or args.model
    try:
        if model is not None and not os.path.exists(model) and model not in KNOWN_MODELS:
            raise ValueError(f"{model}: model path does not exist (nor the name of an "
                             f"installed model: {', '.join(KNOWN_MODELS)})")
        config = engine_config(args)
        template = args.chat_template
        if template is not None and os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                template = f.read()
        elif template is not None and "{{" not in template and "{%" not in template:
            raise ValueError(f"--chat-template {template}: no such file, and not a template "
                             f"either (no {{{{ or {{%)")
        names = tuple(args.served_model_name or [model or DEFAULT_MODEL_NAME])
        template_kwargs = {}
        if args.default_chat_template_kwargs:
            try:
                template_kwargs = json.loads(args.default_chat_template_kwargs)
            except ValueError as exc:
                raise ValueError(f"--default-chat-template-kwargs is not JSON: {exc}") from None
            if not isinstance(template_kwargs, dict):
                raise ValueError("--default-chat-template-kwargs must be a JSON object")
        server_config = ServerConfig(
            host=args.host, port=args.port, served_model_names=names,
            api_keys=tuple(args.api_key),
            stream_interval=args.stream_interval, allowed_origins=tuple(args.allowed_origins),
            max_queued_requests=(DEFAULT_MAX_QUEUED if args.max_queued_requests is None
                                 else args.max_queued_requests),
            chat_template=template,
            trust_request_chat_template=args.trust_request_chat_template,
            chat_template_timeout=args.chat_template_timeout,
            allowed_hosts=tuple(args.allowed_hosts),
            grammar_compile_timeout=args.grammar_compile_timeout,
            max_request_body_bytes=(DEFAULT_MAX_BODY_BYTES if args.max_request_body_bytes is None
                                    else args.max_request_body_bytes),
            keepalive_interval=args.keepalive_interval,
            stream_resume_window=args.stream_resume_window,
            connections=ConnectionLimits(max_connections=args.max_connections,
                                         header_timeout=args.header_timeout,
                                         send_timeout=args.send_timeout),
            uvicorn_log_level=args.uvicorn_log_level,
            enable_log_requests=args.enable_log_requests,
            sampling_defaults=_sampling_defaults(args.generation_config, model),
            reasoning_parser=args.reasoning_parser,
            reasoning_field=args.reasoning_field,
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            tool_call_parser=args.tool_call_parser,
            default_chat_template_kwargs=template_kwargs,
            data_parallel_size=args.data_parallel_size,
            ray_address=args.ray_address,
            routing_policy=args.routing_policy,
        )
        if server_config.data_parallel_size > 1 and importlib.util.find_spec("ray") is None:
            raise ValueError("--data-parallel-size needs Ray: pip install 'rillm[ray]'")
    except ValueError as exc:
        print(f"rillm: error: {exc}", file=sys.stderr)
        return 2
    from rillm.server.runner import serve

    return serve(config, server_config, started)


def process_started() -> float:
    """When this process started, on the `time.monotonic()` clock: the "ready in" line counts
    the interpreter's start and the imports too. Linux: the start time in /proc/self/stat, in
    clock ticks since boot (CLOCK_BOOTTIME, so a suspend between does not count); elsewhere,
    now."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command's name
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0 <= age < 3600 else now


def run_bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from rillm.bench.serve import (
        Target,
        Workload,
        make_prompts,
        plot,
        prompts_needed,
        run_benchmark,
        table,
    )
    from rillm.bench.serve import to_json as results_json

    console = Console(stderr=True)
    targets = []
    for i, spec in enumerate(args.server or ["http://127.0.0.1:8000/v1"]):
        name, sep, url = spec.partition("=")
        if not sep or "://" in name:
            name, url = (f"server{i + 1}" if args.server and len(args.server) > 1
                         else "server"), spec
        targets.append(Target(name, url.rstrip("/"), args.model, args.api_key))
    if len({t.name for t in targets}) != len(targets):
        print("rillm bench serve: error: server names must differ (NAME=URL)", file=sys.stderr)
        return 2
    if any(c < 1 for c in args.concurrency) or args.output_len < 1 or args.input_len < 1:
        print("rillm bench serve: error: --concurrency, --input-len and --output-len must be "
              "positive", file=sys.stderr)
        return 2
    workload = Workload(args.endpoint, args.dataset, args.input_len, args.output_len,
                        not args.natural_length, args.seed)
    def per_level(concurrency: int) -> int:
        return args.num_prompts or max(8, 4 * concurrency)

    rates = args.request_rate or [None]
    levels = [(c, r, per_level(c)) for c in args.concurrency for r in rates]
    with console.status("loading the tokenizer"):
        tokenizer = _bench_tokenizer(args.tokenizer)
    prompts = make_prompts(tokenizer, workload,
                           prompts_needed([count for _, _, count in levels] * args.rounds))
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        try:
            results = asyncio.run(run_benchmark(targets, workload, prompts, levels,
                                                rounds=args.rounds, progress=progress,
                                                timeout=args.timeout))
        except Exception as exc:  # noqa: BLE001 - a server that cannot be reached at all
            print(f"rillm bench serve: error: {exc}", file=sys.stderr)
            return 1
    Console(width=None if sys.stdout.isatty() else 160).print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results_json(results, workload, targets), f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 1 if any(r.failures for r in results) else 0


def _bench_tokenizer(path: str | None) -> object:
    from rillm.loader import default_model_path
    from rillm.loader.tokenizer import load_gguf_tokenizer, load_hf_tokenizer

    path = path or default_model_path()
    return load_gguf_tokenizer(path) if path.endswith(".gguf") else load_hf_tokenizer(path)


if __name__ == "__main__":
    sys.exit(main())
