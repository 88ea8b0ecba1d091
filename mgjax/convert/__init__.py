"""Hugging Face safetensors <-> mgjax models: a lazy reader/writer and the key-mapping loader."""
