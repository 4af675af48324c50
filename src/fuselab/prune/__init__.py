"""prune stage: BlockPruner (arXiv:2406.10594) block search, whole-layer and ShortGPT baselines, export.

Public entry points (import them from their modules; this package imports nothing heavy):

- :func:`fuselab.prune.run.run_prune`: recipe -> resumable search -> verified pruned checkpoint;
- :func:`fuselab.prune.blocks.inspect_blocks` and :class:`fuselab.prune.blocks.BlockMasker`: find and remove
  blocks of a transformers model in memory;
- :func:`fuselab.prune.search.greedy_search` / :func:`fuselab.prune.search.shortgpt_search`;
- :func:`fuselab.prune.export.export_pruned` and :func:`fuselab.prune.loading.load_pruned_model`;
- :func:`fuselab.prune.evaluate.file_perplexity`.
"""
