"""Click commands that live outside cli.py (cli.py registers them); each is thin: parse, call, print."""
