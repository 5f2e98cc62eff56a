"""`python -m codecomplete.lsp`: the language server (same as `codecomplete-lsp`)."""

import sys

from .main import main

sys.exit(main())
