"""fuselab: turn several existing LLMs into one better LLM.

Stages (each a sub-package with a Python API and a ``fuselab <command>`` front end):

- :mod:`fuselab.modeling`: load, inspect and convert Hugging Face checkpoints and tokenizers.
- :mod:`fuselab.merge`: streaming parameter-space merging (linear, task arithmetic, TIES, DARE, SCE, VaRM).
"""

__version__ = "0.1.0"
