"""Formats the user hands us or we hand back: plain text files, strict JSON, YAML with limits, typed JSON."""
