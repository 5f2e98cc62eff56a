"""`python -m codecomplete.lsp`: the language server (same as `codecomplete-lsp`)."""

import sys

from .server import main

sys.exit(main())
