-- Runs once, when PostgreSQL initialises an empty volume: the auth app's user store lives in its
-- own database (MLFLOW_AUTH_DB), apart from the tracking store (POSTGRES_DB), since both keep an
-- alembic version table.
CREATE DATABASE mlflow_auth;
