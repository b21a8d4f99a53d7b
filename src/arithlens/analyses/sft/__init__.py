"""Precise SFT (paper § 5): ``trainer`` (exact Precise SFT, full SFT, LoRA), ``evaluation`` (the
training and held-out data, scoring a delta against the base model), ``naming`` (each row's name and
family, the deltas kept for chapter 6; imports nothing) and ``comparison`` (chapter 4's method grid)."""
