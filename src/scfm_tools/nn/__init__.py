"""Shared torch building blocks (attention, Performer/FAVOR+, value encoders, pooling)."""

from ._attention import MultiheadSelfAttention, TransformerEncoder, TransformerEncoderLayer

__all__ = ["MultiheadSelfAttention", "TransformerEncoder", "TransformerEncoderLayer"]
