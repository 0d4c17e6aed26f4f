"""Pure ops over local parameter shards: linear, norms, rope, attention, mlp, moe, embeddings."""
