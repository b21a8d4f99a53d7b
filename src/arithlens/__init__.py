"""arithlens: a re-executable companion to Zhang et al., "Interpreting and Improving Large Language
Models in Arithmetic Calculation" (ICML 2024, arXiv 2409.01659), built on TransformerLens 4.x."""

import warnings

__version__ = "0.1.0"

# transformers imports tqdm.auto; in a kernel without ipywidgets that warns into every executed
# notebook. Our progress bars go to the terminal (arithlens.core.progress), so the warning is noise.
warnings.filterwarnings("ignore", message="IProgress not found")
