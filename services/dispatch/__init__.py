"""The pool wire format: tensors on the wire (`wire`), what a pool call carries in both directions and how a
pool checks it (`codec`), and the dtype a pool computes each dispatch format in (`precision`)."""

DISPATCH_DTYPES = ("fp8", "bf16", "fp32")  # activations to the pools: e4m3 + scales, bfloat16, float32 (exact)
POOL_TRANSPORTS = ("stream", "unary")  # one long-lived ForwardStream per pool, or a Forward call per pool per layer
