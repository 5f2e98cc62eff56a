"""Scorers: pass@k, exact match, edit similarity, and small statistics."""

from __future__ import annotations

import math

from codecomplete.bench.common import percentile


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021); k > n uses all n."""
    if n <= 0:
        return 0.0
    k = min(k, n)
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k), as a product to stay stable for large n
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute one character)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(a: str, b: str) -> float:
    """1 - levenshtein / longer length: 1.0 for equal strings, 0.0 for nothing in common."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def first_line(text: str) -> str:
    """Text up to the first newline that follows some non-blank character, trailing blanks dropped."""
    content = len(text) - len(text.lstrip())
    end = text.find("\n", content)
    return (text if end == -1 else text[:end]).rstrip()


def same_first_line(generated: str, reference: str) -> bool:
    """Exact match of first lines (trailing whitespace ignored)."""
    return first_line(generated) == first_line(reference)


def same_line(generated: str, reference: str) -> bool:
    """Exact match of the generated text's first line against a one-line reference."""
    return generated.split("\n", 1)[0].rstrip() == reference.rstrip()


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    """p50 / p90 / mean of per-request latencies (NaN when there are none)."""
    return {
        "latency_p50_ms": percentile(latencies_ms, 50),
        "latency_p90_ms": percentile(latencies_ms, 90),
        "latency_mean_ms": mean(latencies_ms),
    }


def pass_at_k_summary(passes: list[list[bool]], ks: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)) -> dict[str, float]:
    """Mean unbiased pass@k over problems, for every k up to the largest sample count."""
    if not passes:
        return {}
    largest = max(len(p) for p in passes)
    out = {}
    for k in ks:
        if k > largest:
            break
        out[f"pass@{k}"] = mean(pass_at_k(len(p), sum(p), k) for p in passes)
    return out
