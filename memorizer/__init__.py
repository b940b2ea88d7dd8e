"""Tiny SD-1.x-format model that memorizes a handful of scikit-image photographs (test fixture)."""
