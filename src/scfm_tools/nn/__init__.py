"""Shared torch building blocks (attention, Performer/FAVOR+, value encoders, pooling)."""
