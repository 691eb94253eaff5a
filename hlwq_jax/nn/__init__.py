"""Functional building blocks (pure functions over explicit param dicts; leaves are arrays or quantized pytrees).

Einsum letter legend used across hlwq_jax.nn:
  b batch, t/s query/key positions, d model width, f MLP/expert width, h heads, k kv heads (attention),
  g q heads per kv head (attention) or B/C groups (SSD), r heads per B/C group (SSD), e experts / s expert slots,
  c chunks, l/s (or q) positions inside a chunk, p Mamba head dim, n SSM state size, a routed assignments (T*k).

Modules: norms (RMSNorm, grouped gated RMSNorm), attention (causal GQA + KV cache), mlp (relu2 / SwiGLU / GeGLU),
mamba2 (Mamba2 mixer), moe (sigmoid-router MoE).
"""
