"""Generation and serving: decoding loops with a KV cache, ``generate`` / ``chat`` / ``serve`` and MGM's
text-to-image hand-off. Above ``data``.
"""
