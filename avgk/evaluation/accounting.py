"""Every sample accounted for: what an evaluation read against what the manifest says each split holds."""

from __future__ import annotations


class SampleCountError(ValueError):
    """An evaluation read fewer (or more) samples than the manifest lists, under eval.strict."""


def account_samples(*, read: dict[str, int], expected: dict[str, int], strict: bool, shards: str) -> dict[str, dict[str, int]]:
    """{split: {"expected", "read", "missing"}} for the metrics document; under `strict` any difference raises.

    `read` must already be summed over every rank (each sample is scored on exactly one).
    """
    samples = {split: {"expected": int(expected[split]), "read": int(n), "missing": int(expected[split]) - int(n)}
               for split, n in read.items()}
    short = shortfall(samples, shards=shards)
    if short and strict:
        raise SampleCountError(
            f"data error: {short}: the broken shards and keys are in the warnings above; re-run `avgk prepare` "
            "for that folder, or set eval.strict=false to score what was read (the counts go into metrics.json)"
        )
    return samples


def shortfall_warning(samples: dict[str, dict[str, int]], *, shards: str) -> str:
    """The console line of a non-strict evaluation that read fewer samples than the manifest, '' when none."""
    short = shortfall(samples, shards=shards)
    return f"warning: {short} (eval.strict=false: metrics over the samples read)" if short else ""


def shortfall(samples: dict[str, dict[str, int]], *, shards: str) -> str:
    """One line naming every split whose count differs from the manifest's, '' when none does."""
    parts = [f"split {split!r} read {c['read']} of the manifest's {c['expected']} samples"
             for split, c in samples.items() if c["missing"]]
    return f"{shards}: " + "; ".join(parts) if parts else ""
