"""Weight diffs between two checkpoints (safetensors folders or GGUF files), without loading a model."""
