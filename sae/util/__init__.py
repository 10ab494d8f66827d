"""Plumbing every layer uses: the input-error type, atomic files, provenance, the device, CLI flags.

Imports nothing from the other subpackages.
"""
