"""What the client said it supports (initialize's capabilities), as the server uses it."""

from __future__ import annotations

from dataclasses import dataclass

from lsprotocol import types


@dataclass(frozen=True)
class ClientSupport:
    """The client features the server adapts to; all off until initialize says otherwise."""

    progress: bool = False  # window/workDoneProgress: progress while the model loads
    configuration: bool = False  # workspace/configuration: settings can be pulled
    markdown: bool = False  # Markdown in completion item documentation

    @classmethod
    def from_capabilities(cls, caps: types.ClientCapabilities) -> ClientSupport:
        item = caps.text_document and caps.text_document.completion and caps.text_document.completion.completion_item
        doc_formats = (item and item.documentation_format) or []
        return cls(progress=bool(caps.window and caps.window.work_done_progress),
                   configuration=bool(caps.workspace and caps.workspace.configuration),
                   markdown=types.MarkupKind.Markdown in doc_formats)
