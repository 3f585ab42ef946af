"""Ingestion of a site's inbox: scanning and reading files (``inbox``), the durable
content-addressed store and quarantine (``storage``), and the pipeline that validates,
de-duplicates and records every file (``pipeline``)."""

from __future__ import annotations
