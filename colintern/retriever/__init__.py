"""The retriever: the model (backbone + head), where hidden states become embeddings (pooling), scoring (exact MaxSim, the fused kernel), token pooling, similarity maps, checkpoints and export."""
