"""The green dashboard: MLflow's tracking server, unchanged, plus pages under ``/green/``
(``mlflow server --app-name green-mlops``; with MLflow's basic-auth: ``--app-name
green-mlops-auth``). See docs/dashboard.md.

Both names are ``mlflow.app`` entry points (pyproject.toml), factories that MLflow's server
command hands to uvicorn (``--factory``) or to gunicorn/waitress: they add the ``/green/``
blueprint to MLflow's Flask app and return what MLflow's own app would be under that server
(the FastAPI wrapper under uvicorn, the Flask app otherwise).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["create_app", "create_auth_app"]


def create_app() -> Any:
    """MLflow's server with the green pages (no login)."""
    from mlflow.server import app

    from green_mlops.integrations.mlflow.app.routes import blueprint

    if "green_mlops" not in app.blueprints:
        app.register_blueprint(blueprint)
    if os.environ.get("_MLFLOW_SGI_NAME") == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app


def create_auth_app() -> Any:
    """MLflow's basic-auth server (``--app-name basic-auth``) with the green pages behind the
    same login: each page is registered with basic-auth's validators (an experiment's or a
    run's page needs read permission on it, the overview shows the readable experiments)."""
    from green_mlops.extras import install_command, missing_modules

    if missing_modules("dashboard-auth"):
        raise ImportError(
            f"MLflow's basic-auth needs Flask-WTF: {install_command('dashboard-auth')}"
        )
    from mlflow.server import app
    from mlflow.server.auth import create_app as create_basic_auth_app

    from green_mlops.integrations.mlflow.app.routes import blueprint, register_validators

    if "green_mlops" not in app.blueprints:
        app.register_blueprint(blueprint)
    register_validators()
    return create_basic_auth_app(app)
