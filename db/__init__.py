"""emowatch's database: ``models`` (ORM), ``session`` (engines, sessions), ``migrate``
(Alembic from Python, ``init_db``), and one small query module per table group: ``sites``,
``inbox`` (images, quarantine, ingestion batches), ``features``, ``checks``, ``adaptations``,
``deployments``, ``outbox``, ``locks``, ``status``. All SQL lives in this package."""
