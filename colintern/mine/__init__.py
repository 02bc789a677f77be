"""Hard-negative mining: the job (miner), the search over the page store, and the page store."""
