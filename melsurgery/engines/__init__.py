"""Running patched checkpoints in engines: the custom layer shipped into checkpoints, the vLLM plugin."""
