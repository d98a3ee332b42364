"""Pruned checkpoints: the record (``permsparse.json``), folding, saving, loading, checking, and one HTML page
that compares several (:mod:`.compare`)."""
