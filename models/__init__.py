"""Model architecture, import, quantization, export and training (codecomplete.models).

Modules that need torch import it themselves; `config` and `folder` do not.
"""
