"""Serving engines other than transformers (llama.cpp), reached through their own programs."""
