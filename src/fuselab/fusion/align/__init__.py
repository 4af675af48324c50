"""Token alignment across tokenizers: which source position feeds which pivot position (``sequence``), and
which pivot id each source candidate token becomes (``vocab``); ``project`` applies both to distributions."""

from fuselab.fusion.align.sequence import (
    SequenceAlignment,
    align_sequences,
    sequence_aligner_names,
)
from fuselab.fusion.align.vocab import VocabMap, build_vocab_map, vocab_mapping_names

__all__ = [
    "SequenceAlignment",
    "VocabMap",
    "align_sequences",
    "build_vocab_map",
    "sequence_aligner_names",
    "vocab_mapping_names",
]
