"""Tokenizers behind one interface (see `base.Tokenizer`)."""

from visgen.tokenizers.base import FrozenNetTokenizer, PixelTokenizer, Tokenizer
from visgen.tokenizers.kl import KLTokenizer, SDVAETokenizer
from visgen.tokenizers.vq import VQTokenizer

__all__ = ["FrozenNetTokenizer", "KLTokenizer", "PixelTokenizer", "SDVAETokenizer", "Tokenizer", "VQTokenizer"]
