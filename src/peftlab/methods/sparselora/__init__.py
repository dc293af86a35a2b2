"""SparseLoRA: LoRA whose frozen projections compute only the channels an estimator predicts matter, for
context tokens (supervised ones run dense).

- `method`: the method (its spec is `methods.specs.SparseLoraSpec`): estimator, per-layer sparsity, schedule.
- `channels`: the sparse projections, attention heads and split FFNs, and their FLOP counts.
- `profile`: sparsity calibrated to a loss budget (a measured profile, then a knapsack).
"""

from peftlab.methods.sparselora.method import SparseLoraMethod, layer_sparsity

__all__ = ["SparseLoraMethod", "layer_sparsity"]
