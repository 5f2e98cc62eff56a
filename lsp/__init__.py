"""The pygls language server (codecomplete.lsp): LSP <-> engine, nothing more."""
