"""Moving a site's champion and what a person reads about it: the moves (``actions``:
approve, auto-promote, reject, roll back), the rule (``blessing``), who may act and
the gate record (``gate_record``), the champion history (``history``), decisions made
in the MLflow UI (``sync``, ``sync_tasks``), the MLflow descriptions
(``descriptions``) and the promotion e-mails' texts (``messages``)."""

from __future__ import annotations
