"""Offline tools that sit beside the training recipes (checkpoint converters, ...)."""
