"""Install the torchvision shim before any test module imports timm (see riformer/_compat.py)."""
import riformer  # noqa: F401
