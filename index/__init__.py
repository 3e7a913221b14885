"""Item indexing: an RQ-VAE turns item text embeddings into short, distinct code sequences."""
