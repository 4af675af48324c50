"""Data that ships inside the fuselab package.

- :mod:`fuselab.data.bundled`: small real conversation sets in OpenAI ``messages`` form, converted from
  PyPI wheels (ChatterBot's English dialog corpus for ``chat``, OpenAI HumanEval for ``code``), each split
  into ``train`` and ``heldout``. ``load_bundled("chat", "heldout")`` returns the rows;
  ``scripts/build_bundled_data.py`` rebuilds the files (see ``data/bundled/README.md``).
"""
