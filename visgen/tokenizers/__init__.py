"""Tokenizers behind one interface (see `base.Tokenizer`)."""

from visgen.tokenizers.base import PixelTokenizer, Tokenizer
from visgen.tokenizers.kl import KLTokenizer, SDVAETokenizer

__all__ = ["KLTokenizer", "PixelTokenizer", "SDVAETokenizer", "Tokenizer"]
