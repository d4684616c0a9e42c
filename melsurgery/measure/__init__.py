"""What a patch does, measured: the one definition of each quantity, the probes, verify."""
