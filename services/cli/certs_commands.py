"""`expertmesh certs`: certificates for mutual TLS between the services (local use; cert-manager on a cluster)."""

from __future__ import annotations

from pathlib import Path

import typer

from services.cli.output import fail

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Certificates for mutual TLS.")


@app.command("make")
def make(
    directory: Path = typer.Argument(..., help="Where to write ca.crt, tls.crt, tls.key."),
    hosts: list[str] = typer.Option(
        [],
        "--hosts",
        help="Names and addresses the services are reached by (repeatable; localhost and 127.0.0.1 are always in).",
    ),
    days: int = typer.Option(365, "--days", min=1, max=3650, help="Validity."),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Write a CA and one service certificate signed by it; pass the directory as --tls-dir to every service."""
    from services.rpc.certs import make_certs

    existing = [n for n in ("ca.crt", "tls.crt", "tls.key") if (directory / n).exists()]
    if existing and not force:
        fail(f"{directory / existing[0]} exists (pass --force to replace)")
    try:
        make_certs(directory, hosts, days)
    except OSError as exc:
        fail(f"cannot write certificates to {directory}: {exc.strerror or exc}")
    except ValueError as exc:
        fail(f"bad --hosts: {exc}")
    typer.echo(
        f"wrote ca.crt, tls.crt, tls.key to {directory} (valid {days} days for localhost, 127.0.0.1"
        + "".join(f", {h}" for h in hosts)
        + ")"
    )
