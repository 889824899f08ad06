"""Text parsers for chat outputs: reasoning blocks and tool calls, streamed or whole.

Pure Python on text (no tokens, no torch): the server feeds them each choice's deltas.
"""
