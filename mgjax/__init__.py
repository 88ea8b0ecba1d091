"""mgjax: Mini-Gemini and Mini-InternVL in JAX / Flax NNX, with Hugging Face checkpoints in and out."""

from mgjax.pretrained import from_pretrained, init, save_pretrained

__all__ = ["from_pretrained", "init", "save_pretrained"]
__version__ = "0.1.0"
