"""The pygls language server (codecomplete.lsp): LSP <-> engine, nothing more.

    server.py     handlers, scheduling, main() (`codecomplete-lsp`, `python -m codecomplete.lsp`)
    protocol.py   pygls's protocol made to answer every request and log protocol garbage
    documents.py  open documents, incremental edits, UTF-8/16/32 positions
    settings.py   the `codecomplete` settings section (shared with the VS Code extension)
    items.py      engine candidates -> inline items and completion-menu items
    worker.py     the one thread that owns the engine
    engines.py    which engine it holds: the team server, a child process (default), in-process
    replay.py     typing replay over stdio: per-keystroke latency (bench latency --lsp)
    testing.py    a fake engine and raw-message helpers for tests
    nvim/lua/codecomplete/init.lua   the Neovim client module
"""
