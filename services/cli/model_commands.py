"""`expertmesh init-model`, `score` and `generate` against a local model directory."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import typer

from services.cli.output import StreamedText, fail, progress_reporter
from services.errors import ExpertmeshError, InvalidRequestError

UINT32_LIMIT = 2**32  # token ids, max_tokens and top_k travel as uint32 to a gateway
SEED_LIMIT = 2**64  # seeds as uint64


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InvalidRequestError(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise InvalidRequestError("--tokens is empty")
    return ids


def check_sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None) -> None:
    """What needs no model: finite numbers in range. Checked before a model is loaded or a gateway called."""
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequestError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequestError(f"top_p must lie in (0, 1], got {top_p}")
    if not 0 <= top_k < UINT32_LIMIT:
        raise InvalidRequestError(f"top_k must lie in [0, {UINT32_LIMIT - 1}], got {top_k}")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise InvalidRequestError(f"seed must lie in [0, 2**64), got {seed}")


def check_against_model(
    ids: list[int] | None,
    vocab_size: int,
    max_context: int,
    max_tokens: int | None = None,
    score_top_k: int | None = None,
) -> None:
    """What needs the model's sizes (0: not known, then only what the wire format can carry)."""
    if ids is not None:
        limit = vocab_size or UINT32_LIMIT
        bad = [t for t in ids if not 0 <= t < limit]
        if bad:
            where = f"the vocabulary [0, {vocab_size})" if vocab_size else f"[0, {UINT32_LIMIT})"
            raise InvalidRequestError(f"token id {bad[0]} is outside {where}")
    if max_tokens is not None:
        limit = max_context or UINT32_LIMIT - 1
        if not 1 <= max_tokens <= limit:
            raise InvalidRequestError(f"max_tokens must lie in [1, {limit}], got {max_tokens}")
    if score_top_k is not None:
        limit = vocab_size or UINT32_LIMIT - 1
        if not 0 <= score_top_k <= limit:
            raise InvalidRequestError(
                f"top_k must lie in [0, {limit}]" + (" (the vocabulary)" if vocab_size else "") + f", got {score_top_k}"
            )


def check_not_empty(text: str | None) -> None:
    if text is not None and not text:
        raise InvalidRequestError("the prompt is empty")


def init_model(
    directory: Path = typer.Argument(..., help="Where to write the checkpoint."),
    preset: str = typer.Option(
        "tiny",
        help="tiny (tests) or small (benchmarks): random weights; demo: the tiny "
        "architecture trained about a minute on Python source.",
    ),
    seed: int = typer.Option(0, help="Random seed for the weights (and, for demo, the training batches)."),
    fp8: bool = typer.Option(True, "--fp8/--no-fp8", help="FP8 block-scaled projections (as DeepSeek ships) or BF16."),
    force: bool = typer.Option(False, help="Replace an existing directory."),
) -> None:
    """Write a DeepSeek-V3-architecture model in the real Hugging Face checkpoint layout: random weights, or
    (--preset demo) trained on the Python standard library's source."""
    from services.format.presets import PRESETS, preset_config
    from services.training.demo import DEMO_PRESET

    if preset not in PRESETS and preset != DEMO_PRESET:
        fail(f"unknown preset {preset!r} (choose from {', '.join([*PRESETS, DEMO_PRESET])})")
    if not 0 <= seed < SEED_LIMIT:
        fail(f"--seed must lie in [0, 2**64), got {seed}")
    if directory.exists() and not directory.is_dir():
        fail(f"{directory} exists and is not a directory")
    try:
        if directory.exists() and any(directory.iterdir()):
            if not force:
                fail(f"{directory} exists and is not empty (use --force to replace it)")
            shutil.rmtree(directory)
        if preset == DEMO_PRESET:
            _write_demo(directory, seed, fp8)
            return
        from services.format.model_writer import write_random_model  # torch: only once there is a model to write

        cfg = preset_config(preset, fp8=fp8)
        with progress_reporter(True) as progress:
            report = progress and (lambda d, t: progress("writing", d, t))
            write_random_model(directory, cfg, seed=seed, progress=report)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        fail(f"cannot write the model to {directory}: {exc.strerror or exc}{where}")
    typer.echo(f"wrote {preset} model ({'fp8' if fp8 else 'bf16'}, seed {seed}) to {directory}")


def _write_demo(directory: Path, seed: int, fp8: bool) -> None:
    """Train the demo model (about a minute on 2 cores), saying what it is; progress on stderr (a bar on a
    terminal, else a line every quarter)."""
    from services.training.demo import DEMO_STEPS, demo_description, write_demo_model

    typer.echo(
        f"training the demo model: the tiny DeepSeek-V3 architecture, {DEMO_STEPS} steps on the Python "
        "standard library's source (about a minute on 2 cores)"
    )
    with progress_reporter(True) as progress:

        def on_step(step: int, steps: int, loss: float) -> None:
            if progress:
                progress("training", step, steps)
            elif step == 1 or step % max(1, steps // 4) == 0:
                typer.echo(f"  step {step}/{steps}: loss {loss:.3f}", err=True)

        result = write_demo_model(directory, seed=seed, fp8=fp8, steps=DEMO_STEPS, on_step=on_step)
    first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
    typer.echo(
        f"trained {result.steps} steps in {result.seconds:.0f} s: loss {first:.2f} at the first step, "
        f"{last:.2f} over the last 10, {result.held_out_loss:.2f} on modules held out of training "
        "(nats per token)"
    )
    typer.echo(
        f"wrote demo model ({'fp8' if fp8 else 'bf16'}, seed {seed}) to {directory}: {demo_description(result.steps)}"
    )


def _model_vocab(model: Path) -> int:
    """vocab_size from config.json, read before any weight is: bad token ids fail without loading the model."""
    from services.format.config import ModelConfig

    if not model.is_dir():
        fail(f"no model directory at {model}")
    try:
        return ModelConfig.from_file(model).vocab_size
    except UnicodeDecodeError as exc:
        where = model / "config.json"
        raise InvalidRequestError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (AttributeError, TypeError, ValueError) as exc:  # valid JSON of the wrong shape
        raise InvalidRequestError(f"{model / 'config.json'}: malformed ({type(exc).__name__}: {exc})") from None


def _load_engine(model: Path, quiet: bool, device: str = "auto", mtp: bool = False, num_speculative_tokens: int = 1):
    """The in-process engine; a missing, truncated or corrupt checkpoint is an ExpertmeshError naming the file, a
    missing GPU (--device cuda) a DeviceUnavailableError naming the flag (before any weight is read)."""
    if not model.is_dir():
        fail(f"no model directory at {model}")
    from services.gateway.engine import Engine

    with progress_reporter(not quiet) as progress:
        return Engine.from_dir(
            model, device=device, progress=progress, mtp=mtp, num_speculative_tokens=num_speculative_tokens
        )


DEVICE_OPTION_HELP = "With --model: where to compute, auto (cuda when torch sees a GPU), cpu or cuda."


def check_device_option(device: str, target: Optional[str]) -> None:
    """A known device name, and none asked of a gateway (it computes where its own --device says)."""
    from services.math.device import check_device_name

    check_device_name(device)
    if target and device != "auto":
        raise InvalidRequestError(
            "--device applies to --model (in process); a gateway computes where its own --device says"
        )


def _engine_limits(engine) -> tuple[int, int]:
    return engine.cfg.vocab_size, int(getattr(engine, "max_context", 0) or 0)


# the --target forms' connection options, shared by score and generate
ApiKeyOption = typer.Option(
    None,
    "--api-key",
    envvar="EXPERTMESH_API_KEY",
    show_envvar=False,
    help="With --target: the gateway's API key (default $EXPERTMESH_API_KEY).",
)
TlsDirOption = typer.Option(None, "--tls-dir", help="With --target: mutual TLS (ca.crt, tls.crt, tls.key).")
MAX_TIMEOUT_S = 86400.0  # a day: longer bounds overflow the clock's wait (and mean none)
TimeoutOption = typer.Option(
    None,
    "--timeout-s",
    help="With --target: seconds a score may take, and the longest a generation may go without a message from the "
    "gateway (a long queue or prefill before the first token) before it is given up (default 300).",
)


def score(
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (in process)."),
    target: Optional[str] = typer.Option(None, "--target", help="A running gateway, HOST:PORT."),
    text: Optional[str] = typer.Option(None, "--text", help="Text to score (tokenized with the model's tokenizer)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token ids, comma-separated."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Alternatives to list per position."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    api_key: Optional[str] = ApiKeyOption,
    tls_dir: Optional[Path] = TlsDirOption,
    timeout_s: Optional[float] = TimeoutOption,
    device: str = typer.Option("auto", "--device", help=DEVICE_OPTION_HELP),
) -> None:
    """Log-probability of every token given the ones before it, with the top-K alternatives."""
    if (text is None) == (tokens is None):
        fail("give exactly one of --text and --tokens")
    _one_backend(model, target)
    try:
        check_device_option(device, target)
        ids = parse_token_ids(tokens) if tokens is not None else None
        check_not_empty(text)
        if target:

            def call(client):
                info = client.model_info()
                check_against_model(ids, info["vocab_size"], info["max_context"], score_top_k=top_k)
                return client.score(text, ids, top_k)

            result = _remote(target, call, api_key, tls_dir, timeout_s)
        else:
            check_against_model(ids, _model_vocab(model), 0, score_top_k=top_k)
            engine = _load_engine(model, as_json, device)
            ids = engine.encode(text) if ids is None else ids
            check_against_model(ids, *_engine_limits(engine), score_top_k=top_k)
            result = score_json(ids, engine.score(ids, top_k=top_k))
    except ExpertmeshError as exc:
        fail(str(exc), _exit_code(exc))
    if as_json:
        typer.echo(json.dumps(result))
        return
    for i, p in enumerate(result["positions"]):
        lp = "-" if p["logprob"] is None else f"{p['logprob']:9.4f}"
        alts = "  ".join(f"{a['token_id']}:{a['logprob']:.3f}" for a in p["top"])
        typer.echo(f"{i:5d} {p['token_id']:7d} {lp}  {alts}")


def score_json(ids: list[int], positions) -> dict:
    return {
        "token_ids": ids,
        "positions": [
            {"token_id": p.token_id, "logprob": p.logprob, "top": [{"token_id": t, "logprob": v} for t, v in p.top]}
            for p in positions
        ],
    }


def _one_backend(model: Optional[Path], target: Optional[str]) -> None:
    if (model is None) == (target is None):
        fail("give exactly one of --model and --target")


def _exit_code(exc: ExpertmeshError) -> int:
    """2 for bad input (arguments, model directory, request), 1 for a failure of the service."""
    from services.errors import CacheFullError, PoolUnavailableError

    return 1 if isinstance(exc, (PoolUnavailableError, CacheFullError)) else 2


def _remote(target: str, call, api_key: str | None, tls_dir: Path | None, timeout_s: float | None):
    """Run `call(client)` against a gateway; gRPC errors become one-line CLI errors naming the address."""
    import grpc

    from services.cli.gateway_client import GatewayClient, check_target, rpc_error

    check_target(target)
    if timeout_s is not None and not 0 < timeout_s <= MAX_TIMEOUT_S:  # NaN fails too
        raise InvalidRequestError(
            f"--timeout-s must be a number of seconds in (0, {MAX_TIMEOUT_S:.0f}], got {timeout_s}"
        )
    if tls_dir is not None:
        from services.rpc import tls

        tls.configure(tls_dir)
    client = GatewayClient(target, api_key=api_key, **({} if timeout_s is None else {"timeout_s": timeout_s}))
    try:
        return call(client)
    except grpc.RpcError as exc:
        fail(*rpc_error(target, exc))
    finally:
        client.close()


def generate(
    prompt: Optional[str] = typer.Argument(None, help="Prompt text."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (in process)."),
    target: Optional[str] = typer.Option(None, "--target", help="A running gateway, HOST:PORT."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Prompt as token ids, comma-separated."),
    max_tokens: int = typer.Option(16, "--max-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0: no top-k cut."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    api_key: Optional[str] = ApiKeyOption,
    tls_dir: Optional[Path] = TlsDirOption,
    timeout_s: Optional[float] = TimeoutOption,
    device: str = typer.Option("auto", "--device", help=DEVICE_OPTION_HELP),
    mtp: bool = typer.Option(
        False,
        "--mtp/--no-mtp",
        help="With --model: speculative decoding with the checkpoint's "
        "MTP layer (the same tokens at temperature 0); --json reports its drafts.",
    ),
    num_speculative_tokens: int = typer.Option(
        1,
        "--num-speculative-tokens",
        help="With --mtp: draft tokens per step (1 runs the MTP layer once; more apply it again on its own guesses).",
    ),
) -> None:
    """Generate a continuation of a prompt (greedy at temperature 0)."""
    if (prompt is None) == (tokens is None):
        fail("give exactly one of PROMPT and --tokens")
    _one_backend(model, target)
    try:
        check_device_option(device, target)
        if mtp and target:
            raise InvalidRequestError("--mtp applies to --model (in process); a gateway drafts when its own --mtp says")
        from services.gateway.config import MAX_SPECULATIVE_TOKENS  # no torch

        if not 1 <= num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError(
                f"--num-speculative-tokens must lie in [1, {MAX_SPECULATIVE_TOKENS}], got {num_speculative_tokens}"
            )
        ids = parse_token_ids(tokens) if tokens is not None else None
        check_not_empty(prompt)
        check_sampling(max_tokens, temperature, top_p, top_k, seed)
        if target:
            streamed = StreamedText(enabled=not as_json)  # the text printed as the gateway streams it

            def call(client):
                info = client.model_info()
                check_against_model(ids, info["vocab_size"], info["max_context"], max_tokens)
                with streamed:
                    return client.generate(
                        prompt, ids, max_tokens, temperature, top_p, top_k, seed, on_text=streamed.write
                    )

            out = _remote(target, call, api_key, tls_dir, timeout_s)
        else:
            check_against_model(ids, _model_vocab(model), 0)
            engine = _load_engine(model, as_json, device, mtp, num_speculative_tokens)
            from services.gateway.sampling import SamplingParams  # torch: only once a model is to be run

            ids = engine.encode(prompt) if ids is None else ids
            check_against_model(ids, *_engine_limits(engine), max_tokens)
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
            streamed = StreamedText(enabled=not as_json)  # the text printed as the engine makes it
            with streamed:
                result = engine.generate([ids], params, on_text=lambda _, piece: streamed.write(piece))[0]
            out = {
                "prompt_token_ids": result.prompt_token_ids,
                "token_ids": result.token_ids,
                "text": engine.decode(result.token_ids),
                "finish_reason": result.finish_reason,
            }
            if mtp:
                out["mtp"] = {"draft_tokens": result.draft_tokens, "accepted_tokens": result.accepted_tokens}
    except ExpertmeshError as exc:
        fail(str(exc), _exit_code(exc))
    if as_json:
        typer.echo(json.dumps(out))
    elif not streamed.wrote:  # no text (a model without a tokenizer): the token ids
        typer.echo(" ".join(map(str, out["token_ids"])))
