"""Tiffin: many models, one box. Shared building blocks for the runners and the entry service."""
