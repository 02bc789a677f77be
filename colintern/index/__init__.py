"""Search indexes: the Python API (Index), the on-disk page index and its checksummed segments, the search (exact, FAISS first stage) and the Qdrant backend."""
