"""Writing patches: plan the recipes, write a standalone safetensors folder or GGUF file, manifests."""
