"""Factored layers, the one module swap, and adapters on factors."""
