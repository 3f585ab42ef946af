"""What a person opens: the HTML check report and status page (``pages``, Jinja2
templates in ``templates/``) and the Evidently appendix (``evidently``)."""

from __future__ import annotations
