"""Data: the synthetic language, preference/prompt files, the embedded tiny models."""
