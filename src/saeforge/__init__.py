"""saeforge: sparse autoencoders for any Hugging Face causal LM.

The package reads as the pipeline: models -> data -> activations -> saes -> training -> evals.
Importing it is cheap; heavy modules load when used.
"""

__version__ = "0.1.0"
