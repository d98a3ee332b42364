"""Pruned checkpoints: what leaves a run, and what a user receives.

In: a pruned model and its report. Out: a folder (masked or folded) with its record (``permsparse.json``),
and back from it a loaded model, a check of its content and behaviour, and one HTML page comparing several.

- :mod:`.record`: the record, typed; :mod:`.digest`: the digest of every tensor and of the record;
- :mod:`.fold`: the exact folds of permutations into producers' rows; :mod:`.save`: the export;
- :mod:`.destination`: the output folder claimed (locked, writable, space) before heavy work;
- :mod:`.load`: :func:`load`; :mod:`.check`: :func:`check_checkpoint`; :mod:`.reference`: the logits recorded
  at export; :mod:`.compare`: the HTML page.
"""
