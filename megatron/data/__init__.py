"""Data pipeline: tokenizers, the mmap indexed dataset (.bin/.idx), GPT sample indexing, blending and loaders."""
