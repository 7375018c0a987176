"""Ground truth on real text: Python syntax labels from tokenize/ast, coverage, reconstruction, k-sparse probing.

Submodules are imported on use: labels (character and token labels), windows (labelled held-out
windows), metrics (coverage, reconstruction), probing (k-sparse probes), run (``probe_saved``),
commands (``saeforge probe``).
"""
