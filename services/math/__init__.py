"""Model math shared by the gateway and the pools: norms, SwiGLU, packed linears, the experts seam."""
