"""Guard indexes of millions of images, built on Ray Data (python -m guard_build; see ray_builder).

Importing this package needs no Ray: only a build does."""
from .ray_builder import (BuildReport, build_guard_on_ray, folder_sources, manifest_sources,  # noqa: F401
                          read_rgb, start_ray)
