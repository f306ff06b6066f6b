"""alignloop.feedback: the human-feedback labeling app, its store, labeler quality and export.

    from alignloop.feedback.store import Store          # SQLAlchemy store (SQLite WAL / PostgreSQL), Alembic
    from alignloop.feedback.app import create_app       # FastAPI app (server-rendered, CSRF, roles)
    from alignloop.feedback import quality              # pure statistics: kappa, alpha, Dawid-Skene, bias
    from alignloop.feedback.export import export_records, ExportOptions

See README.md in this folder (its "Store" and "Web app layout" sections map the modules). The web dependencies are
the `web` extra (`pip install alignloop[web]`); `quality` needs only numpy, scipy, scikit-learn and krippendorff.
"""
