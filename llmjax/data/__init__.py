"""The data layer: tokenizers, TFDS sources, and the packing, resumable per-host pipeline."""
from llmjax.data.config import DataConfig
from llmjax.data.device import Prefetcher, prefetch_to_device, to_global
from llmjax.data.pipeline import BatchIterator, epoch_statistics, make_iterator
from llmjax.data.tokenizer import SpecialTokens, Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "BatchIterator", "DataConfig", "Prefetcher", "SpecialTokens", "Tokenizer", "epoch_statistics", "load_tokenizer",
    "make_iterator", "prefetch_to_device", "to_global", "train_sentencepiece",
]
