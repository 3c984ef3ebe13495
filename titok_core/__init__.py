"""The ground floor of titok-gen: what the tokenizer, generator, sampling and eval packages share.

Device and precision (``runtime``), the transformers' attention (``attention``), model files and
safe loading (``checkpoints``), image data and dataset formats (``data``, ``formats``, ``images``),
the built-in datasets (``builtin``), learning-rate schedules (``lr_schedule``), Lightning helpers
(``trainer``) and image metrics (``metrics``). Nothing here imports the packages above it.
"""
