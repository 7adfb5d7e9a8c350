"""Bridges to other projects' weights (a layer above ``nn`` and ``training``; nothing in the runtime imports it)."""
