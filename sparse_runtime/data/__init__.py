"""Data sets: WikiText-2, C4 windows, Alpaca, and the zero-shot suites."""
from .paths import ENV_VAR, data_dirs, find_file
from .text import alpaca_prompt, alpaca_records, c4_documents, c4_windows, tokenize_stream, wikitext2_text

__all__ = ["ENV_VAR", "data_dirs", "find_file", "alpaca_prompt", "alpaca_records", "c4_documents",
           "c4_windows", "tokenize_stream", "wikitext2_text"]
