"""Placement state: the placement data model, its Redis store, and the per-expert load store."""
