"""Prompts: ComfyUI's grammar, the tokenizer and the prompt dialects (``syntax=``).

Text in, token windows with weights out; nothing here runs a model."""
