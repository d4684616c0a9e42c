"""Calibration: the text that goes in, the streaming engine that runs it layer by layer, the records."""
