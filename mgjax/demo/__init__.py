"""The embedded demos: each demo task's tiny model config, tokenizer and synthetic data (mgm_task,
grounding_task), and the tour of every model family behind ``python -m mgjax.demo`` (tour). Above ``eval``.
"""
