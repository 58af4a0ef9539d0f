"""Errors raised by the data layer."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset on disk is missing, unreadable or inconsistent; the message names the culprit."""
