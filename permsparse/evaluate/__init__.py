"""The evaluation stage: how good a (pruned) model is.

In: a model and its tokenizer or processor, an evaluation text, task or image set. Out: typed measures
(:class:`~.measures.Perplexity`, :class:`~.measures.Similarity`, zero-shot task results, VLM accuracy), which
the checkpoint's record keeps and :mod:`permsparse.checkpoint.compare` sets side by side.

- :mod:`.measures`: perplexity by the standard protocol and an encoder's similarity to the dense model;
- :mod:`.zeroshot`: zero-shot and MMLU accuracy through lm-evaluation-harness, offline;
- :mod:`.vlm`: zero-shot image classification and caption perplexity of a vision-language model.
"""
