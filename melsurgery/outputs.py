"""The names of the files melsurgery writes beside the weights: defined once, used by every writer and reader."""

MODEL_CARD = "README.md"
PROVENANCE = "provenance.json"
MANIFEST = "melsurgery-manifest.yaml"
GENERATED = (MODEL_CARD, PROVENANCE, MANIFEST)
