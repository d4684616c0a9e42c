"""The scan: the ME Layer and its explanation (attribution, attention input) from calibration records."""
