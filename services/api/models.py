"""Every catalog table, imported in one place so Alembic sees them all."""

from services.api.projects.models import ApiKey, Project
from services.api.providers.models import Deployment, ExternalModel, ExternalProvider, ProviderKeys

__all__ = ["ApiKey", "Deployment", "ExternalModel", "ExternalProvider", "ProviderKeys", "Project"]
