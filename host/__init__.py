"""The project's own ComfyUI test/demo host: install, launch, drive over HTTP, convert workflows."""
