"""Training the kept weights after pruning: distillation towards the dense model.

In: the dense and the pruned model, calibration windows, the run's masks and permutations. Out: the
distilled kept weights, and masks that follow the weights as they train. The objective is the learned
permutation's (:mod:`permsparse.permute.objective`).

- :mod:`.distill`: distillation of the kept weights after pruning;
- :mod:`.following_masks`: the masks of the kept weights while they train, fixed or following the weights.
"""
