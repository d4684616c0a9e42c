"""Tests of melsurgery/formats/."""
