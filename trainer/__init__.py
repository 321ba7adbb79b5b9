"""The trainer: images on disk -> trained upgraders -> versions in the model store.

`python -m trainer --help` (or `upgrader-train`) for the recipe and its flags; the
training script itself is `trainer/train.py`.
"""
