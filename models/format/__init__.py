"""The model format, numpy only: what a model is on disk and how it is read.

`config` (ModelConfig, presets), `folder` (the model folder, safetensors, int8
quantization), `tokenizer`, the importers `hf_import` (Hugging Face folders) and
`gguf_import` (.gguf files), and `source` (resolve a path to one ModelSource). The
runtimes and the engine import this package; it imports nothing of theirs, nor torch.
"""
