"""The training loop shared by every task (``training/loop.py``).

Layering: core (config, loss, models, modalities, anchor) <- data <- this package <-
evaluation / interop / cache <- tasks (``train.py`` alignment, ``anchor_finetune.py``) <- scripts.
Nothing here imports ``imagebind_lite.evaluation``, ``.cache`` or ``.interop``: a task brings
what it evaluates and saves.
"""
