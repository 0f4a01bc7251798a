"""The expertmesh command: model verbs, `up`, and a typer sub-app per admin noun."""
