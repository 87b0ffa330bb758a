"""Shared torch building blocks (attention, Performer/FAVOR+, value encoders, pooling)."""

from ._attention import MultiheadSelfAttention, TransformerEncoder, TransformerEncoderLayer
from ._flowformer import FlowAttention, FlowformerEncoder, FlowformerLayer, make_norm
from ._performer import FastAttention, Performer, PrecomputedTokens, favor_attention

__all__ = [
    "FastAttention",
    "FlowAttention",
    "FlowformerEncoder",
    "FlowformerLayer",
    "MultiheadSelfAttention",
    "Performer",
    "PrecomputedTokens",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "favor_attention",
    "make_norm",
]
