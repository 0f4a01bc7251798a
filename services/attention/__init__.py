"""MLA attention with YaRN RoPE and the paged latent KV cache: what the gateway runs per layer."""
