"""The `expertmesh` command line. Model verbs sit at the top level; admin nouns get sub-apps of their own.

`main` (the console script) turns every usage error into one line `expertmesh: error: ...` on stderr with exit
code 2, and Ctrl-C into one line with exit code 130: never a traceback for bad input.
"""

from __future__ import annotations

import sys

PROG = "expertmesh"

try:  # a Ctrl-C while the console script is still importing ends the same way as one during a command
    import typer

    from services.cli import certs_commands, load_commands, model_commands, placement_commands, pools_commands, up
    from services.cli.output import EXIT_INTERRUPTED, EXIT_USAGE, error_line

    try:  # typer >= 0.20 carries its own copy of click
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover - older typer on click
        from click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except KeyboardInterrupt:  # pragma: no cover - timing
    sys.stderr.write(f"{PROG}: interrupted\n")
    raise SystemExit(130) from None

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="expertmesh: DeepSeek-V3-class MoE serving with experts as services.",
)
app.command("init-model")(model_commands.init_model)
app.command("score")(model_commands.score)
app.command("generate")(model_commands.generate)
app.command("up")(up.up)
app.add_typer(placement_commands.app, name="placement")
app.add_typer(load_commands.app, name="load")
app.add_typer(pools_commands.app, name="pools")
app.add_typer(certs_commands.app, name="certs")
app.command("rebalance")(placement_commands.rebalance)


def _usage_line(exc: UsageError) -> str:
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return error_line(exc.format_message().rstrip(".") + hint)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]) and return its exit code, printing errors as one line."""
    try:
        code = app(args=argv, prog_name=PROG, standalone_mode=False)
    except NoArgsIsHelpError as exc:  # a bare `expertmesh` or `expertmesh placement`: the help, as click does
        text = exc.format_message()
        if text:
            typer.echo(text)
        return EXIT_USAGE
    except UsageError as exc:  # missing or unknown option, bad value, unknown command
        typer.echo(_usage_line(exc), err=True)
        return EXIT_USAGE
    except ClickException as exc:
        typer.echo(error_line(exc.format_message()), err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo(error_line("aborted"), err=True)
        return 1
    except KeyboardInterrupt:  # outside a command (typer turns one inside into exit code 130)
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:  # only Ctrl-C ends a command with 130 (`up` handles SIGINT itself)
        typer.echo(f"{PROG}: interrupted", err=True)
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
