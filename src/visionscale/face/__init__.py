"""Face detection (BlazeFace), alignment, embeddings, LFW verification and a persistent gallery."""
