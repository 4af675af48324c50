"""lm-eval task folder bundled with fuselab (YAMLs, their JSON Lines data and the loader they name).

A package only so that setuptools ships it; lm-eval reads the folder through ``include_path``.
"""
