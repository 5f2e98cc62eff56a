"""Names of documents as the prompt gives them: paths relative to the workspace folders."""

from __future__ import annotations

from pygls.uris import to_fs_path
from pygls.workspace import Workspace

from codecomplete.prompt import workspace_name


def path_of(uri: str) -> str:
    """The file-system path of a file: URI; any other URI as it is."""
    try:
        return to_fs_path(uri) or uri
    except Exception:
        return uri


def prompt_path(uri: str, roots: list[str]) -> str:
    """The name the prompt gives the document at uri (see prompt.workspace_name); roots are
    the workspace folders' URIs. A document with no file (untitled:Untitled-1) keeps its name."""
    path = path_of(uri)
    if path == uri and "://" not in uri and ":" in uri:
        return uri.split(":", 1)[1]
    return workspace_name(path, [path_of(r) for r in roots])


def root_uris(workspace: Workspace) -> list[str]:
    """The URIs of the open workspace folders, and the root the client named."""
    roots = [f.uri for f in workspace.folders.values()]
    if workspace.root_uri and workspace.root_uri not in roots:
        roots.append(workspace.root_uri)
    return roots
