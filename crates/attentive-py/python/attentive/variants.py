"""Attention beyond softmax over a mask (filled in below)."""
