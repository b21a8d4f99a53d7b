"""Precise SFT (paper § 5): ``trainer`` (exact Precise SFT, full SFT, LoRA) and ``evaluation`` (the
training and held-out data, scoring a delta against the base model)."""
