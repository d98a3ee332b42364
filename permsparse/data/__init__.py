"""The data stage: what a run reads, before any model work.

In: a source name (``wikitext2``, ``c4``, ``alpaca``, a file, a mixture such as ``c4:3,alpaca:1``,
``cifar10``, ``imagefolder:PATH``, ``cifar10-vlm``) and a tokenizer or processor. Out: token windows
``(count, seqlen)``, preprocessed images and labels, image-text windows, and the :class:`CalibrationSet`
a pruning run calibrates, learns and distils on.

- :mod:`.text`: text sources, tokenised windows, evaluation texts and mixtures;
- :mod:`.images`: labelled images (CIFAR-10, class-per-folder trees) and top-k accuracy;
- :mod:`.imagetext`: image-text calibration windows for a vision-language model's language tower;
- :mod:`.calibration`: the calibration set of a run, assembled from the above.
"""
