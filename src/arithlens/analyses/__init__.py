"""The analyses: a loaded model and an item set in, tidy DataFrames out.

Head localization (``end_cache``: the clean/counterfactual runs cached at END and the scores read
off the unembedding; ``patching``: path patching of every head; ``attribution``: attribution patching
and EAP-IG), ``knockout``, MLP tracing (``mlp``), ``transfer`` to other suites, chapter 7's
``agreement``, ``robustness`` and ``same_answer``, chapter 6's ``numbers``, ``neurons`` (attribution,
keep-top-k), ``heuristics`` (what the top neurons respond to) and ``neuron_changes`` (how fine-tuning
moves them), and Precise SFT (``sft/``). Fast paths and their one-pass-per-head references sit side
by side. Imports ``tasks`` and ``core``.
"""
