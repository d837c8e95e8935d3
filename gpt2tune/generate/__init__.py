"""Generate: decoding loops over a KV cache (`sampling`)."""
