"""Input-channel permutations: searches (cp, ria, output), sites, and the learned permutation."""
