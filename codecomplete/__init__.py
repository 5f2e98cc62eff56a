"""codecomplete: local, offline code completion."""

# the one place the version is written: pyproject reads it (dynamic version), the language
# server reports it, and a test checks the VS Code extension's package.json against it
__version__ = "0.1.0"
