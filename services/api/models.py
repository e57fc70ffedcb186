"""Every catalog table, imported in one place so Alembic sees them all."""

from services.api.projects.models import ApiKey, Project

__all__ = ["ApiKey", "Project"]
