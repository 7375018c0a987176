"""saeforge: sparse autoencoders for any Hugging Face causal LM.

The packages are the pipeline's layers, lowest first: io, config, models, data, activations, saes,
evals, training, analysis, toy, circuits, groundtruth, viewer, cli; each imports only from the layers below it
(docs/ARCHITECTURE.md). Importing the package itself is cheap: subpackages load when imported.
"""

__version__ = "0.1.0"
