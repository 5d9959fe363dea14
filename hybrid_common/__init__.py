"""Plumbing shared by both stages and the orchestrator, none of it about images, models or shards.

- :mod:`hybrid_common.options`: option dataclasses whose fields carry their own CLI flag, help and aliases, so an
  option is defined once and every CLI builds its flags from it.
- :mod:`hybrid_common.renamed`: keyword arguments renamed for the glossary keep their old spelling, with a warning.
"""

from hybrid_common.options import add_options, add_progress_flag, option, options_from_args
from hybrid_common.renamed import renamed_keywords

__all__ = ["add_options", "add_progress_flag", "option", "options_from_args", "renamed_keywords"]
