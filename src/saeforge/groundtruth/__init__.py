"""Ground truth on real text: Python syntax labels from tokenize/ast, coverage, reconstruction, k-sparse probing.

Submodules are imported on use: labels (character and token labels), windows (labelled held-out
windows), collect (one LM pass over them at several hooks), metrics (coverage, reconstruction),
probing (k-sparse probes), tpp, absorption, run (``probe_many``, ``probe_saved``), tables (printed
tables), folders (sweep and transcoders folders), commands (``saeforge probe``).
"""
