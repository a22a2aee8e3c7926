"""Example experiment specs shipped with the package (``laulima demo`` runs them)."""
