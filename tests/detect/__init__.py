"""Tests of melsurgery/detect/."""
