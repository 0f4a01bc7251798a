"""Placement state: the placement data model, its Redis store, and the per-expert load store."""

DEFAULT_LOAD_WINDOW_S = 30.0  # the window the autoscaler plans for and the admin commands report (light: no numpy)
