"""The Hugging Face Hub side: model card, card metadata, base-model ids, push."""
