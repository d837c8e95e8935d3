"""Evaluate: metrics over generated text (`poems`: verse-form metrics; `prosody`: rhyme and tone from pinyin)."""
