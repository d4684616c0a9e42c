"""Searching recipe settings per model (Optuna): sink cut against KL."""
