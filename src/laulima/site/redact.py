"""What a site may say to the hub about a failure: the problem, never where its data lives.

Error texts at a site name absolute paths, case file names (which in hospitals often hold
patient or accession numbers), shapes and affines. The full text stays in the site's log
and audit trail; the hub gets :func:`redact`'s version plus a reference to that audit entry.
Redaction replaces, in this order: the site's own folders (by name), any other absolute
path, file names with a data or code extension, and runs of numbers (shapes, affines,
intensities), and quoted values (a cell of a table, a patient's identifier) other than the
names the hub gave the site. What remains is the sentence that says what went wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MAX_REASON_CHARS", "redact"]

MAX_REASON_CHARS = 600
"""Longest reason sent to the hub: one or two sentences, not a traceback."""

_ABSOLUTE_PATH = re.compile(r"""(?<![\w.:/<>-])(?:~|[A-Za-z]:)?[/\\](?:[^\s'"`,;:()\[\]{}<>|]+)""")
"""A POSIX or Windows absolute path (or ~/...), up to the first space, quote or bracket."""
_EXTENSIONS = (
    r"nii\.gz|nii|dcm|dicom|ima|mha|mhd|nrrd|nhdr|mgz|mgh|hdr|img|npy|npz|h5|hdf5|pkl|pickle|pt|pth|ckpt|"
    r"safetensors|png|jpe?g|tiff?|bmp|csv|tsv|json|xml|txt|log|zip|tar|gz|bz2|xz|bundle|key|pem|crt|db|sqlite"
)
_FILE_NAME = re.compile(rf"(?<![\w<])[\w.+\-]+\.(?:{_EXTENSIONS})(?![\w])", re.IGNORECASE)
_KNOWN_NAMES = frozenset({"dataset.json", "dataset_fingerprint.json", "plans.json", "policy.toml", "manifest.json"})
"""Names of layout files that say which file of a dataset is wrong without naming a case."""
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RUN = re.compile(rf"[\[(]\s*{_NUMBER}(?:\s*[,;\s]\s*[\[(]?\s*{_NUMBER}\s*[\])]?){{2,}}\s*[\])]")
"""Three or more numbers in brackets or parentheses: a shape, an affine, a vector of values."""
_QUOTED = re.compile(r"""(?<!\w)(?P<q>['"])(?P<text>[^'"\n]{0,200})(?P=q)(?!\w)""")
"""A quoted value; an apostrophe inside a word (the site's) opens and closes nothing."""


def redact(
    text: str, *, folders: Iterable[str | Path] = (), keep: Iterable[str] | None = None, limit: int = MAX_REASON_CHARS
) -> str:
    """``text`` without paths, file names or per-case values, at most ``limit`` characters.

    ``folders`` are the site's own (home, dataset, task folder): replaced first by name, so a
    path inside them reads ``<site folder>`` rather than a guess at where a path ends.
    ``keep``: the quoted names that may stay (the dataset's, the experiment's, the
    algorithm's: the hub sent them); None keeps every quoted text.
    """
    out = " ".join(str(text).split())  # one line: tracebacks and multi-line messages collapse
    for folder in sorted({str(f) for f in folders if str(f) not in ("", "/", ".")}, key=len, reverse=True):
        out = re.sub(re.escape(folder) + r"""[^\s'"`,;:()\[\]{}<>|]*""", "<site folder>", out)
    out = _ABSOLUTE_PATH.sub("<path>", out)
    out = _FILE_NAME.sub(lambda m: m[0] if m[0].lower() in _KNOWN_NAMES else "<file>", out)
    out = _NUMBER_RUN.sub("<values>", out)
    if keep is not None:
        names = set(keep)
        out = _QUOTED.sub(lambda m: m[0] if m["text"] in names or m["text"].startswith("<") else "'<value>'", out)
    if len(out) > limit:
        out = out[: limit - 1].rstrip() + "…"
    return out
