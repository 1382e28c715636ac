"""Text corpora, tokenizers and token shards."""
