"""Tests of melsurgery/surgery/."""
