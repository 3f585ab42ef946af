"""emowatch's database: ``models`` (ORM), ``session`` (engines, sessions, ``init_db``),
``queries`` (the shared read/write functions), ``migrate`` (Alembic from Python)."""
