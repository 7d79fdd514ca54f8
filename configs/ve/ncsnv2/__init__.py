"""Config variants; see configs/__init__.py."""
