"""Names the command line knows before anything is loaded: the built-in models and the vision-language task.

They live here, apart from the modules that build those models, so that parsing arguments (and
``--help``) never imports torch or transformers.
"""
SMOLLM2_ALIAS = "smollm2-135m"  # permsparse.smollm2: the embedded default model
TESTBED_ALIAS = "cifar10-vit"  # permsparse.testbed: a CIFAR-10 ViT built here
VLM_ALIAS = "cifar10-vlm"  # permsparse.vlm_testbed: a small vision-language model built here
VLM_TASK = "cifar10-vlm"  # permsparse.vlm_eval: ten-way CIFAR-10 accuracy and caption perplexity
