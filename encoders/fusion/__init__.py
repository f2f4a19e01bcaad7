"""Encoder-side fusion: several towers' feature sets -> one token sequence (see base.py)."""
