"""Lossless image compression with integer flows (IDF) and the standard codecs to compare with."""
