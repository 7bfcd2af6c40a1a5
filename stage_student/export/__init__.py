"""`distily export`: a trained 1.58-bit student as packed ternary safetensors (run.py) or a llama.cpp GGUF (gguf.py)."""
