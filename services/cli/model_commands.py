"""`expertmesh init-model`, `score` and `generate` against a local model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import typer

from services.errors import ExpertmeshError, InvalidRequestError
from services.cli.output import fail, progress_reporter


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InvalidRequestError(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise InvalidRequestError("--tokens is empty")
    return ids


def init_model(
    directory: Path = typer.Argument(..., help="Where to write the checkpoint."),
    preset: str = typer.Option("tiny", help="tiny (tests) or small (benchmarks)."),
    seed: int = typer.Option(0, help="Random seed for the weights."),
    fp8: bool = typer.Option(True, "--fp8/--no-fp8", help="FP8 block-scaled projections (as DeepSeek ships) or BF16."),
    force: bool = typer.Option(False, help="Replace an existing directory."),
) -> None:
    """Write a random DeepSeek-V3-architecture model in the real Hugging Face checkpoint layout."""
    from services.format.model_writer import write_random_model
    from services.format.presets import PRESETS, preset_config

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if directory.exists() and any(directory.iterdir()):
        if not force:
            fail(f"{directory} exists and is not empty (use --force to replace it)")
        shutil.rmtree(directory)
    cfg = preset_config(preset, fp8=fp8)
    with progress_reporter(True) as progress:
        write_random_model(directory, cfg, seed=seed, progress=progress and (lambda d, t: progress("writing", d, t)))
    typer.echo(f"wrote {preset} model ({'fp8' if fp8 else 'bf16'}, seed {seed}) to {directory}")


def _load_engine(model: Path, quiet: bool):
    from services.gateway.engine import Engine

    if not model.is_dir():
        fail(f"no model directory at {model}")
    with progress_reporter(not quiet) as progress:
        return Engine.from_dir(model, progress=progress)


def score(
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (in process)."),
    target: Optional[str] = typer.Option(None, "--target", help="A running gateway, HOST:PORT."),
    text: Optional[str] = typer.Option(None, "--text", help="Text to score (tokenized with the model's tokenizer)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token ids, comma-separated."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Alternatives to list per position."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Log-probability of every token given the ones before it, with the top-K alternatives."""
    if (text is None) == (tokens is None):
        fail("give exactly one of --text and --tokens")
    _one_backend(model, target)
    try:
        ids = parse_token_ids(tokens) if tokens is not None else None
        if target:
            result = _remote(target, lambda c: c.score(text, ids, top_k))
        else:
            engine = _load_engine(model, as_json)
            ids = engine.encode(text) if ids is None else ids
            result = score_json(ids, engine.score(ids, top_k=top_k))
    except ExpertmeshError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result))
        return
    for i, p in enumerate(result["positions"]):
        lp = "-" if p["logprob"] is None else f"{p['logprob']:9.4f}"
        alts = "  ".join(f"{a['token_id']}:{a['logprob']:.3f}" for a in p["top"])
        typer.echo(f"{i:5d} {p['token_id']:7d} {lp}  {alts}")


def score_json(ids: list[int], positions) -> dict:
    return {"token_ids": ids, "positions": [
        {"token_id": p.token_id, "logprob": p.logprob, "top": [{"token_id": t, "logprob": v} for t, v in p.top]}
        for p in positions]}


def _one_backend(model: Optional[Path], target: Optional[str]) -> None:
    if (model is None) == (target is None):
        fail("give exactly one of --model and --target")


def _remote(target: str, call):
    """Run `call(client)` against a gateway; gRPC errors become one-line CLI errors."""
    import grpc

    from services.cli.gateway_client import GatewayClient

    client = GatewayClient(target)
    try:
        return call(client)
    except grpc.RpcError as exc:
        fail(f"{target}: {exc.code().name}: {exc.details()}")
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
) -> None:
    """Generate a continuation of a prompt (greedy at temperature 0)."""
    from services.gateway.sampling import SamplingParams

    if (prompt is None) == (tokens is None):
        fail("give exactly one of PROMPT and --tokens")
    _one_backend(model, target)
    try:
        ids = parse_token_ids(tokens) if tokens is not None else None
        if target:
            out = _remote(target, lambda c: c.generate(prompt, ids, max_tokens, temperature, top_p, top_k, seed))
        else:
            engine = _load_engine(model, as_json)
            ids = engine.encode(prompt) if ids is None else ids
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
            result = engine.generate([ids], params)[0]
            out = {"prompt_token_ids": result.prompt_token_ids, "token_ids": result.token_ids,
                   "text": engine.decode(result.token_ids), "finish_reason": result.finish_reason}
    except ExpertmeshError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(out["text"] or " ".join(map(str, out["token_ids"])))
