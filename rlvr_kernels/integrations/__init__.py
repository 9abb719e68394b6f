"""Trainer integrations (TRL, verl)."""
