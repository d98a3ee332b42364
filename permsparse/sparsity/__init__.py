"""The pruning itself: statistics of each block's inputs, host scores, and the N:M masks they choose.

In: a block and its calibration inputs. Out: per linear, input statistics (activation norms, Gram
matrices), an importance score ("host") and a mask, N:M in a permuted order or unstructured; and the
pruned linear as it is written into the model.

- :mod:`.statistics`: capture the first block's inputs, collect input statistics, run blocks;
- :mod:`.scores`: magnitude, Wanda and RIA scores;
- :mod:`.masks`: N:M and unstructured masks, and the checks of N:M patterns and permutations;
- :mod:`.targets`: which linears of each block a config prunes;
- :mod:`.layer`: one linear pruned through a candidate permutation, with its errors and weight update.
"""
