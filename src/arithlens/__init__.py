"""arithlens: a re-executable companion to Zhang et al., "Interpreting and Improving Large Language
Models in Arithmetic Calculation" (ICML 2024, arXiv 2409.01659), built on TransformerLens 4.x."""

__version__ = "0.1.0"
