"""The completion job now running for each document: a newer request for it supersedes the older."""

from __future__ import annotations

from .worker import Job


class LatestJobs:
    """At most one job per document URI; superseding answers the old request empty at once."""

    def __init__(self) -> None:
        self._by_uri: dict[str, Job] = {}

    def supersede(self, uri: str) -> None:
        """Stop the document's running job, if any (a newer request came, or the document closed)."""
        job = self._by_uri.pop(uri, None)
        if job is not None:
            job.supersede()

    def track(self, uri: str, job: Job) -> None:
        """Make job the document's running one (after supersede(uri): one job per document)."""
        self._by_uri[uri] = job

    def release(self, uri: str, job: Job) -> None:
        """job is answered: forget it, unless a newer one has taken its place already."""
        if self._by_uri.get(uri) is job:
            del self._by_uri[uri]

    def __len__(self) -> int:
        return len(self._by_uri)
