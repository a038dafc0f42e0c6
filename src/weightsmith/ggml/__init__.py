"""GGML block formats and GGUF files for llama.cpp and Ollama."""
