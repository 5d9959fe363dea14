"""Groups from paths (``--group-regex``): a regex with one capture group, searched in each relative path, gives an
image's group (e.g. a patient), so that stage 2 never splits one group across train, validation and test."""

from __future__ import annotations

import dataclasses
import re

from stage1_extract.inputs.records import Listing
from stage1_extract.errors import OptionError


def compile_group_regex(pattern: str | None) -> re.Pattern | None:
    """``--group-regex``: a regular expression with exactly one capture group, searched in each relative path."""
    if pattern is None:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise OptionError(f"--group-regex {pattern!r} is not a valid regular expression: {exc}") from None
    if regex.groups != 1:
        raise OptionError(f"--group-regex {pattern!r} needs exactly one capture group (found {regex.groups}), "
                         r"e.g. '(patient\d+)_' to group 'cat/patient07_scan2.png' as 'patient07'")
    return regex


def apply_group_regex(listing: Listing, regex: re.Pattern | None) -> Listing:
    if regex is None:
        return listing
    records = []
    for r in listing.records:
        found = regex.search(r.path)
        group = found.group(1) if found and found.group(1) else None
        listing.ungrouped += group is None
        records.append(dataclasses.replace(r, group=group))
    listing.records = records
    return listing
