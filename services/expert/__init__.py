"""The expert pool: the FP8 weight store, grouped expert compute, and the pool server."""
