"""Tests of melsurgery/hub/."""
