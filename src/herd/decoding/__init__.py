"""Everything in herd that exists for speed: how generate() decodes.

- `decoders.py`: the plain decoder (the reference forward) and the fast decoder (a family's
  decode plan, compiled and graph-captured), behind one interface, and the choice between them;
- `plans/`: one decode plan per family;
- `kv.py`: the fast path's key/value stores (contiguous, ring, cross-attention);
- `visibility.py`: the one rule for what a query may attend to;
- `graphs.py`: compilation, CUDA graphs, buckets, greedy choice inside the graph;
- `fusion.py`: projections that share an input, fused into one weight in place.

The model files never import this package (but for the visibility rule, which their masks use).
"""
