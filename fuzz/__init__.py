"""Fuzz harnesses for the pack's input handling (issue #14). Run with `make fuzz`."""
