"""Pruned checkpoints: the record (``permsparse.json``), folding, saving, loading and checking."""
