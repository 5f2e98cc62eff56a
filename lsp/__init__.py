"""The pygls language server (codecomplete.lsp): LSP <-> engine, nothing more.

    main.py          the command line: `codecomplete-lsp`, `python -m codecomplete.lsp`, --check
    server.py        the handlers and the server's state (documents, settings, worker)
    protocol.py      pygls's protocol made to answer every request and log protocol garbage
    process.py       process guards: stdin, stdout kept for LSP, the editor-process watch
    client_log.py    log records to the client as window/logMessage
    capabilities.py  what the client supports, as the server uses it
    documents.py     open documents, incremental edits, UTF-8/16/32 positions
    workspace.py     document names relative to the workspace folders (for the prompt)
    settings.py      the `codecomplete` settings section (shared with the VS Code extension)
    items.py         engine candidates -> inline items and completion-menu items
    worker.py        the one thread that owns the engine
    engines.py       which engine it holds: the team server, a child process (default), in-process
    jobs.py          the running completion per document (newer supersedes older)
    replay.py        typing replay over stdio: per-keystroke latency (bench latency --lsp)
    testing.py       a fake engine and a raw-message writer for tests
    raw_client.py    a pytest-lsp client that sends unvalidated requests (test extra)
    nvim/lua/codecomplete/init.lua   the Neovim client module
"""
