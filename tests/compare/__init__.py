"""Tests of melsurgery/compare/."""
