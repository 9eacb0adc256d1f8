"""Alignment data: constitutional self-critique (the training objectives live in ember.train)."""
