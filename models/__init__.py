"""Model architecture, quantization, export and training (codecomplete.models).

`format` is the model format, numpy only (config, model folder, tokenizer, the Hugging Face
and GGUF importers); the runtimes and the engine import it. `model` (the torch decoder),
`gqa`, the Triton kernels and `train` need torch and import it themselves.
"""
