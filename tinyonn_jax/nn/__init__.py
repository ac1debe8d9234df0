"""Layers every family shares: expert banks and their evaluations, routing, the GAMoE gate,
attention primitives, norms, the packed-batch layout, expert pools and the parameter types.

Vocabulary, one meaning each across the package:
  expert      one member of a stacked bank (an ExpertMLP, a latent attention head, an SPL
              output neuron, a DynONN expert slot)
  site        one place in the model where experts are routed and aggregated: attn (the latent
              heads) or q, k, v (the qkv_routers library) and ffn in DynTRM; attn and ffn in
              DynONN; an SPL module kind
  pool        the fixed slots of an expert bank whose live mask a lifecycle changes (``lifecycle``):
              attn (the latent heads, either layout) and ffn in DynTRM; one per gate in DynONN
  route       a site's routing decision: weights z >= 0 and bool mask (``routing.Route``)
  gate        the routing threshold parameter(s) of a site (``gate``, ``gates``,
              ``gate_param``); the GAMoE gate is the whole routing module of seed 002
  proto       a site's prototype vectors (``proto``, ``proto_weight``, ``proto_sim``)
  probe       a zero tensor added to a site's output; its cotangent is dL/d(output)
  main, meta  the two parameter groups: computation, routing (``variables``)
  step        one refinement step of a recursion (never an optimizer step inside a model)

Shape letters in docstrings and comments:
  B batch rows   T tokens per row   D hidden   H heads   Dh head width   V vocabulary
  P experts of a bank (E for a DynONN pool)   F expert hidden width   S refinement steps
  G DynONN layer groups   L stacked layers   N SPL output neurons
"""
