"""Model families: architecture configs, Flax NNX modules and their Hugging Face I/O."""
