"""Glue for training frameworks. Each submodule imports its framework lazily, on use.

- :mod:`approxbp_fx.integrations.transformers`: Hugging Face ``Trainer`` (``compile_for_trainer``).
"""
