"""Level-based reconcilers: read the world, compute the desired state, apply the difference."""

from .deployment import reconcile_deployment
from .model import reconcile_model
from .profile import reconcile_profile
from .world import World

__all__ = ["World", "reconcile_deployment", "reconcile_model", "reconcile_profile"]
