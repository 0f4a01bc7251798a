"""The pool wire format: what goes to an expert pool and back, in both directions."""

DISPATCH_DTYPES = ("fp8", "bf16", "fp32")  # activations to the pools: e4m3 + scales, bfloat16, float32 (exact)
