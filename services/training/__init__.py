"""Training DeepSeek-V3-architecture models with the project's own torch code (corpus, forward, trainer)."""
