"""Losses: small pure functions over per-pair tensors."""
