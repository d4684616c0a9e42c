"""Support code shared by the tests, not tests themselves (pytest collects nothing here).

- ``helpers``: the real console script in a subprocess (``run_cli``), what a clean refusal looks like
  (``assert_clean_failure``), file snapshots, and the one library ``patch`` helper;
- ``planted``, ``planted_sink``, ``planted_gguf``: tiny models with a planted massive activation (exact
  ground truth), as safetensors folders and GGUF files;
- ``reference``: independent forward hooks that a folded patch must match;
- ``hub_server``: a loopback Hugging Face Hub speaking the real client's HTTP protocol.
"""
