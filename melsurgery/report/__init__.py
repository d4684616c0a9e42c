"""Human-readable renderings of results: text reports and plots."""
