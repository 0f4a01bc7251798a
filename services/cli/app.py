"""The `expertmesh` command line. Model verbs sit at the top level; admin nouns get sub-apps of their own."""

from __future__ import annotations

import typer

from services.cli import load_commands, model_commands, placement_commands, pools_commands, up

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="expertmesh: DeepSeek-V3-class MoE serving with experts as services.")
app.command("init-model")(model_commands.init_model)
app.command("score")(model_commands.score)
app.command("generate")(model_commands.generate)
app.command("up")(up.up)
app.add_typer(placement_commands.app, name="placement")
app.add_typer(load_commands.app, name="load")
app.add_typer(pools_commands.app, name="pools")
app.command("rebalance")(placement_commands.rebalance)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
