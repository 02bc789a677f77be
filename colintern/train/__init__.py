"""Training: the loop (trainer), its components (examples, plan, micro-batches, cache, step loss, logs), losses, GradCache, data parallelism and metric reporting."""
