"""The custom layer shipped (verbatim) into patched checkpoints that need one."""
