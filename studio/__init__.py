"""Preference Studio: label, battle, train, reload, compare."""

__version__ = "0.1.0"
